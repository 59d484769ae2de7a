/*
 * zmm_hi256.S - bank "zmm_hi256": zmm0..zmm15, the full 64 bytes each (the
 * upper 256 bits live in XSAVE component 6, the rest in components 1 and 2).
 * LOAD/STORE layout: zmm(i) at +64*i.  Needs AVX-512F.
 */
    .include "common.S"

    .macro bank_load
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    vmovdqu64 LOAD_AREA + 64 * \n(%rdi), %zmm\n
    .endr
    .endm

    .macro bank_store
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    vmovdqu64 %zmm\n, STORE_AREA + 64 * \n(%rdi)
    .endr
    .endm

    PAYLOAD
