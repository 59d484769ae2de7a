/*
 * hi16_zmm.S - bank "hi16_zmm": zmm16..zmm31, 64 bytes each (XSAVE
 * component 7).  LOAD/STORE layout: zmm(16+i) at +64*i.  Needs AVX-512F.
 */
    .include "common.S"

    .macro bank_load
    .irp n, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    vmovdqu64 LOAD_AREA + 64 * (\n - 16)(%rdi), %zmm\n
    .endr
    .endm

    .macro bank_store
    .irp n, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    vmovdqu64 %zmm\n, STORE_AREA + 64 * (\n - 16)(%rdi)
    .endr
    .endm

    PAYLOAD
