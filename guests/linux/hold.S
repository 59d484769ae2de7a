/*
 * hold.S - the Linux register holder's stand-in for guests/payload/common.S.
 *
 * The holder reuses each bank's load and store sequence unchanged: for bank B,
 * apx_tests.guests.linux writes this file plus the line
 *
 *     .macro PAYLOAD ; HOLD_FUNCTION apx_hold_B ; .endm
 *
 * as `common.S` into an empty directory and runs llvm-mc there on
 * guests/payload/B.S (by absolute path, no -I).  llvm-mc resolves
 * `.include "common.S"` against the working directory first, so B.S gets this
 * file instead of the payload's own common.S: the bank's `bank_load` and
 * `bank_store` macros (the register order ABI) are the very ones the KVM and
 * QEMU payloads run, and PAYLOAD expands to the function below.
 *
 *     void apx_hold_B(struct hold_block *block);      (System V ABI, %rdi)
 *
 * Block layout (all little-endian; holder.c's struct hold_block matches):
 */
    .set HB_DEADLINE,   0x00    /* u64: TSC value at which the spin ends */
    .set HB_RELEASE,    0x08    /* u64: address of a u32; non-zero ends the spin */
    .set HB_YIELD,      0x10    /* u32: non-zero = sched_yield() every iteration */
    .set HB_READY_LEN,  0x14    /* u32: length of the ready line */
    .set HB_READY_BUF,  0x18    /* u64: address of the ready line (written to fd 1) */
    .set HB_SPINS,      0x20    /* u64: iterations done, written after the store */
    .set LOAD_AREA,     0x1000  /* values bank_load puts in the bank */
    .set STORE_AREA,    0x2000  /* where bank_store writes the bank */

    .set SYS_write,       1
    .set SYS_sched_yield, 24

/*
 * `<name>_spin_start` .. `<name>_spin_end` bound the spin loop: a vCPU at CPL3 with RIP
 * in that range runs the holder with the bank loaded (the ready line prints the range).
 *
 * Between bank_load and bank_store the function runs no call and touches no
 * register of any bank: only rax, rcx, rdx, rsi, rdi, r8, r11 and flags.
 * `syscall` clobbers rax, rcx and r11 and nothing else; the kernel must keep
 * every other user register (that is what is being tested).  The two system
 * calls are write(1, ready line) once, right after the load, and, in the
 * context-switch variant, sched_yield() on every 64th iteration.
 */
    .macro HOLD_FUNCTION name
    .text
    .globl \name
    .type \name, @function
    .p2align 4
\name:
    bank_load
    movq    %rdi, %r8                   /* the block, across the write */
    movl    $SYS_write, %eax
    movl    $1, %edi
    movq    HB_READY_BUF(%r8), %rsi
    movl    HB_READY_LEN(%r8), %edx
    syscall                             /* "apx-holder: ready ..." */
    movq    %r8, %rdi
    xorl    %esi, %esi
    .globl \name\()_spin_start
\name\()_spin_start:
.Lspin\@:
    incq    %rsi
    cmpl    $0, HB_YIELD(%rdi)
    je      .Lnoyield\@
    /* Yield every 64th iteration, not every one: a context switch costs thousands of
     * TCG instructions against the loop's dozen, and a QMP stop must still land in the
     * loop (CPL3, RIP in spin_start..spin_end) now and then, also on a loaded host. */
    testq   $63, %rsi
    jnz     .Lnoyield\@
    movl    $SYS_sched_yield, %eax
    syscall
.Lnoyield\@:
    pause
    movq    HB_RELEASE(%rdi), %rax
    cmpl    $0, (%rax)
    jne     .Lrelease\@
    rdtsc
    shlq    $32, %rdx
    orq     %rdx, %rax
    cmpq    HB_DEADLINE(%rdi), %rax
    jb      .Lspin\@
.Lrelease\@:
    .globl \name\()_spin_end
\name\()_spin_end:
    bank_store
    movq    %rsi, HB_SPINS(%rdi)
    ret
    .size \name, . - \name
    .endm

    .section .note.GNU-stack, "", @progbits
