/*
 * opmask.S - bank "opmask": k0..k7, 8 bytes each (XSAVE component 5).
 * LOAD/STORE layout: k(i) at +8*i.  kmovq needs AVX512BW (kmovw would only
 * move 16 bits).  k0 is a valid kmov operand; it is only special as a mask.
 */
    .include "common.S"

    .macro bank_load
    .irp n, 0,1,2,3,4,5,6,7
    kmovq   LOAD_AREA + 8 * \n(%rdi), %k\n
    .endr
    .endm

    .macro bank_store
    .irp n, 0,1,2,3,4,5,6,7
    kmovq   %k\n, STORE_AREA + 8 * \n(%rdi)
    .endr
    .endm

    PAYLOAD
