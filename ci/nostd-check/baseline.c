/* The same C program without the Rust library: subtracted from the footprint build. */
#include <stdio.h>
#include <stddef.h>
int main(void) {
    size_t n = 1;
    printf("footprint: the minimal client sent %zu frames\n", n);
    return n > 0 ? 0 : 1;
}
