/*
 * apx.S - bank "apx": the APX extended GPRs r16..r31, 8 bytes each.
 * LOAD/STORE layout: r(16+i) at +8*i.  The movq forms need the REX2 prefix
 * (0xD5); LLVM >= 18 assembles them, binutils 2.40 does not.
 */
    .include "common.S"

    .macro bank_load
    .irp n, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    movq    LOAD_AREA + 8 * (\n - 16)(%rdi), %r\n
    .endr
    .endm

    .macro bank_store
    .irp n, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    movq    %r\n, STORE_AREA + 8 * (\n - 16)(%rdi)
    .endr
    .endm

    PAYLOAD
