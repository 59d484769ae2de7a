/*
 * xmm.S - bank "xmm": xmm0..xmm15, 16 bytes each (XSAVE component 1).
 * LOAD/STORE layout: xmm(i) at +16*i.  Legacy SSE movdqu, not VEX, so the
 * payload runs with XCR0 = 0x3 (and leaves the upper ymm halves alone).
 */
    .include "common.S"

    .macro bank_load
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    movdqu  LOAD_AREA + 16 * \n(%rdi), %xmm\n
    .endr
    .endm

    .macro bank_store
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    movdqu  %xmm\n, STORE_AREA + 16 * \n(%rdi)
    .endr
    .endm

    PAYLOAD
