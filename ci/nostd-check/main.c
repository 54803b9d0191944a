/* Links the no_std staticlib into a plain C program and runs the codec round trip. */
#include <stdio.h>
#include <stddef.h>
size_t hypha_nostd_roundtrip(void);
int main(void) {
    size_t n = hypha_nostd_roundtrip();
    printf("nostd-check: no_std codec round trip of a %zu-byte frame\n", n);
    return n > 0 ? 0 : 1;
}
