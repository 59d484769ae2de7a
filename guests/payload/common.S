/*
 * common.S - the part every guest payload shares: mailbox layout, the sync
 * protocol, the STORE-vs-EXPECT compare and the final exit.
 *
 * A bank file (guests/payload/<bank>.S) .includes this file, defines two
 * macros, bank_load and bank_store, and then expands PAYLOAD.  It should hold
 * nothing but those load/store sequences; see docs/guests.md.
 *
 * Entry contract (fixed; the KVM micro-VMM and the QEMU stub both honour it):
 *   64-bit mode, CPL3, %rdi = mailbox base (16 KiB, identity mapped),
 *   %rsp = valid stack, RFLAGS.IOPL = 3 so "out" is allowed, CR4.OSFXSR and
 *   CR4.OSXSAVE set, XCR0 enabling the bank.  The first byte is the entry.
 *
 * Rules this file keeps so every payload keeps them:
 *   - position independent: all memory operands are %rdi-relative and all
 *     branches are local, so the object must have no relocations at all
 *     (the builder rejects one that has);
 *   - no CPL0 instruction;
 *   - outside bank_load/bank_store only legacy GPRs are touched (rax, rcx,
 *     rdx, rsi, r8-r11) - never a register of any bank - because the host
 *     snapshots and edits the bank while the guest waits at stage 1.
 *
 * The constants below must equal apx_tests/guests/protocol.py; a test
 * (tests/test_guests_protocol.py) compares the two.
 */

    .text

/* Mailbox header: offsets from %rdi. */
    .set MB_MAGIC,           0x00   /* u32 0x4D585041 'APXM', host writes */
    .set MB_STAGE,           0x04   /* u32 stage reached, guest writes */
    .set MB_GO,              0x08   /* u32 stage released, host writes */
    .set MB_STATUS,          0x0C   /* u32 verdict, guest writes */
    .set MB_MISMATCH_OFFSET, 0x10   /* u32 first differing STORE byte */
    .set MB_BANK_BYTES,      0x14   /* u32 bytes to compare, host writes */

/* Data areas: offsets from %rdi, each AREA_SIZE bytes. */
    .set LOAD_AREA,   0x1000        /* values bank_load puts in the bank */
    .set EXPECT_AREA, 0x2000        /* what the host expects the bank to hold */
    .set STORE_AREA,  0x3000        /* where bank_store writes the bank */
    .set AREA_SIZE,   0x1000

/* Stages (the number written to MB_STAGE and echoed on SYNC_PORT). */
    .set STAGE_STARTED,  0
    .set STAGE_LOADED,   1
    .set STAGE_VERIFIED, 2

/* Verdicts written to MB_STATUS. */
    .set STATUS_OK,       1
    .set STATUS_MISMATCH, 2
    .set NO_MISMATCH,     0xFFFFFFFF  /* MB_MISMATCH_OFFSET when STATUS_OK */

/* I/O ports: 0xE9 exits to the KVM VMM / is QEMU's isa-debugcon (the log
 * then reads "012"); 0xF4 is the VMM's "guest done" / QEMU's isa-debug-exit. */
    .set SYNC_PORT, 0xE9
    .set EXIT_PORT, 0xF4

/*
 * SYNC stage: publish the stage, tell the host, wait to be released.
 * The stage goes to memory before the "out", so whatever the host does on
 * that exit (or whenever it polls) it sees the stage already written.
 * Clobbers %al and flags only.
 */
    .macro SYNC stage
    movl    $\stage, MB_STAGE(%rdi)
    movb    $('0' + \stage), %al
    outb    %al, $SYNC_PORT
.Lsync_wait\@:
    cmpl    $\stage, MB_GO(%rdi)
    je      .Lsync_released\@
    pause
    jmp     .Lsync_wait\@
.Lsync_released\@:
    .endm

/*
 * VERIFY_STORE: compare MB_BANK_BYTES bytes of STORE against EXPECT and write
 * MB_MISMATCH_OFFSET, then MB_STATUS (status last: it is the verdict).
 * A byte loop: at most 4 KiB, and it needs only legacy GPRs - wider compares
 * would need vector registers, which may be the bank under test.
 * Uses %eax, %ecx, %edx and flags.
 */
    .macro VERIFY_STORE
    movl    MB_BANK_BYTES(%rdi), %ecx
    cmpl    $AREA_SIZE, %ecx            /* never read past the areas */
    jbe     .Lverify_count_ok\@
    movl    $AREA_SIZE, %ecx
.Lverify_count_ok\@:
    xorl    %edx, %edx                  /* byte index */
.Lverify_loop\@:
    cmpl    %ecx, %edx
    jae     .Lverify_equal\@
    movzbl  EXPECT_AREA(%rdi,%rdx), %eax
    cmpb    %al, STORE_AREA(%rdi,%rdx)
    jne     .Lverify_differs\@
    incl    %edx
    jmp     .Lverify_loop\@
.Lverify_differs\@:
    movl    %edx, MB_MISMATCH_OFFSET(%rdi)
    movl    $STATUS_MISMATCH, MB_STATUS(%rdi)
    jmp     .Lverify_done\@
.Lverify_equal\@:
    movl    $NO_MISMATCH, MB_MISMATCH_OFFSET(%rdi)
    movl    $STATUS_OK, MB_STATUS(%rdi)
.Lverify_done\@:
    .endm

/*
 * FINISH: report the status on EXIT_PORT, forever.  Under QEMU the first
 * out ends the VM; a VMM that resumes anyway just gets the same exit again,
 * so the payload never runs off its end.
 */
    .macro FINISH
.Lfinish\@:
    movb    MB_STATUS(%rdi), %al
    outb    %al, $EXIT_PORT
    jmp     .Lfinish\@
    .endm

/*
 * PAYLOAD: the stage sequence every bank runs.  bank_load and bank_store are
 * the bank file's macros.  Nothing runs between SYNC STAGE_LOADED and
 * bank_store except the sync itself, so the host's edits at stage 1 are
 * exactly what gets stored.
 */
    .macro PAYLOAD
    SYNC    STAGE_STARTED
    bank_load
    SYNC    STAGE_LOADED
    bank_store
    VERIFY_STORE
    SYNC    STAGE_VERIFIED
    FINISH
    .endm
