/*
 * x87.S - bank "x87": st0..st7 as 80-bit values, 10 bytes each (XSAVE
 * component 0).  LOAD/STORE layout: ST(i) at +10*i.
 *
 * The x87 registers are a stack, so the load pushes st7's value first:
 * after the eight fldt, ST(i) holds LOAD bytes [10i, 10i+10).  The store
 * pops ST(0) first, so the i-th fstpt writes ST(i) to STORE + 10i.
 * fninit gives an empty stack and a control word that masks every exception.
 * fldt/fstpt of 80-bit values are copies without conversion; the host should
 * still use well-formed values (see docs/guests.md).
 */
    .include "common.S"

    .macro bank_load
    fninit
    .irp i, 7,6,5,4,3,2,1,0
    fldt    LOAD_AREA + 10 * \i(%rdi)
    .endr
    .endm

    .macro bank_store
    .irp i, 0,1,2,3,4,5,6,7
    fstpt   STORE_AREA + 10 * \i(%rdi)
    .endr
    .endm

    PAYLOAD
