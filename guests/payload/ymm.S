/*
 * ymm.S - bank "ymm": ymm0..ymm15, 32 bytes each (low halves in the legacy
 * XMM area, upper halves in XSAVE component 2).  LOAD/STORE layout: ymm(i)
 * at +32*i.  Needs AVX and XCR0 bits 1 and 2.
 */
    .include "common.S"

    .macro bank_load
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    vmovdqu LOAD_AREA + 32 * \n(%rdi), %ymm\n
    .endr
    .endm

    .macro bank_store
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    vmovdqu %ymm\n, STORE_AREA + 32 * \n(%rdi)
    .endr
    .endm

    PAYLOAD
