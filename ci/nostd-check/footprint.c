/* Links the minimal no_std client (handshake, one service, one reply) for the size check. */
#include <stdio.h>
#include <stddef.h>
size_t hypha_nostd_engine(void);
int main(void) {
    size_t n = hypha_nostd_engine();
    printf("footprint: the minimal client sent %zu frames\n", n);
    return n > 0 ? 0 : 1;
}
