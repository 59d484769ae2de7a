/*
 * multiboot.S - the QEMU boot stub: a multiboot v1 kernel (flat image, a.out
 * kludge) that QEMU loads with -kernel, switches to 64-bit long mode and
 * enters a bank payload at CPL3 under the payload entry ABI of docs/guests.md.
 *
 * apx_tests/guests/boot.py assembles this file with llvm-mc (x86_64 triple;
 * the first part is .code32), takes the flat .text, appends the payload at
 * PAYLOAD_ADDR and patches the PARAMS block.  Every address below is an
 * absolute constant: the image is loaded at IMAGE_BASE and never moves, so the
 * object has no relocations (the builder checks) and 64-bit code never needs
 * RIP-relative addressing.
 *
 * Guest-physical memory map (identity mapped, 2 MiB pages, U bit set):
 *   0x100000 image: multiboot header, 32-bit entry, 64-bit code
 *   0x100800 GDT (null, kernel code64/data, user code64/data DPL3, TSS)
 *   0x100900 TSS            0x100A00 PARAMS (patched by boot.py)
 *   0x101000 PML4  0x102000 PDPT  0x103000 PD (first 1 GiB)
 *   0x110000 payload (at most PAYLOAD_MAX bytes, appended by boot.py)
 *   0x120000 BOOTINFO (bss): what the stub found (CPUID leaf 0xD, XCR0)
 *   0x128000 kernel stack top, 0x130000 user stack top (bss end)
 *   MAILBOX_GPA (PARAMS): the payload's mailbox, preloaded by QEMU's loader
 *
 * Progress on isa-debugcon (port 0xE9): 'b' 32-bit entry, 'l' long mode,
 * 'u' XCR0 set, about to iretq to CPL3; then the payload's '0' '1' '2'.
 * A boot failure writes 'X' and exits through isa-debug-exit (0xF4) with a
 * BOOT_FAIL_* status (QEMU exit code (status << 1) | 1).
 *
 * Only set-up runs at CPL0: on a nested paravirtual KVM every CPL0
 * instruction is emulated, and SSE/AVX there is an emulation failure.
 * XSETBV, CPUID and control-register writes are fine.
 */

    .set IMAGE_BASE,    0x100000
    .set GDT_ADDR,      IMAGE_BASE + 0x800
    .set GDTR_ADDR,     IMAGE_BASE + 0x880
    .set TSS_ADDR,      IMAGE_BASE + 0x900
    .set TSS_IOMAP,     TSS_ADDR + 0x68
    .set TSS_LIMIT,     TSS_IOMAP + 32 - TSS_ADDR   /* bitmap + terminator byte */
    .set PARAMS_ADDR,   IMAGE_BASE + 0xA00
    .set PML4_ADDR,     IMAGE_BASE + 0x1000
    .set PDPT_ADDR,     IMAGE_BASE + 0x2000
    .set PD_ADDR,       IMAGE_BASE + 0x3000
    .set PAYLOAD_ADDR,  IMAGE_BASE + 0x10000
    .set PAYLOAD_MAX,   0x10000
    .set IMAGE_END,     PAYLOAD_ADDR + PAYLOAD_MAX      /* load_end_addr */
    .set BOOTINFO_ADDR, IMAGE_END                       /* bss from here */
    .set KSTACK_TOP,    IMAGE_END + 0x8000
    .set USTACK_TOP,    IMAGE_END + 0x10000
    .set BSS_END,       USTACK_TOP                      /* bss_end_addr */

/* PARAMS, written by boot.py (offsets from PARAMS_ADDR) */
    .set PARAM_MAGIC,   0x00    /* u32 'APXP' */
    .set PARAM_MAILBOX, 0x08    /* u64 mailbox GPA -> %rdi */
    .set PARAM_XCR0,    0x10    /* u64 XCR0 to set; 0 = every user component
                                   CPUID.(0xD,0) offers except AMX */

/* BOOTINFO, written by the stub (offsets from BOOTINFO_ADDR) */
    .set BI_MAGIC,      0x00    /* u32 'APXB' once the stub has filled it */
    .set BI_XCR0,       0x08    /* u64 XCR0 the stub set */
    .set BI_CPUID1_ECX, 0x10    /* u32 CPUID.1:ECX */
    .set BI_FAIL,       0x14    /* u32 BOOT_FAIL_* or 0 */
    .set BI_LEAF_D,     0x100   /* CPUID.(0xD, i) for i = 0..63: eax ebx ecx edx */
    .set LEAF_D_COUNT,  64

    .set BOOTINFO_MAGIC, 0x42585041     /* 'APXB' */
    .set PARAMS_MAGIC,   0x50585041     /* 'APXP' */

/* Selectors (GDT index << 3 | RPL) */
    .set KCODE, 0x10
    .set KDATA, 0x18
    .set UCODE32, 0x20 | 3
    .set UDATA, 0x28 | 3
    .set UCODE, 0x30 | 3
    .set TSS_SEL, 0x40

    .set DEBUGCON, 0xE9
    .set DEBUG_EXIT, 0xF4

/* Boot failures: status written to isa-debug-exit (< 0x80 so the exit code
   (status << 1) | 1 fits a process exit status). */
    .set BOOT_FAIL_NO_XSAVE, 0x40   /* CPUID.1:ECX[26] (XSAVE) is 0 */
    .set BOOT_FAIL_XCR0,     0x41   /* PARAM_XCR0 asks for bits CPUID.0xD.0 lacks */

    .set CR0_PE, 1
    .set CR0_MP, 1 << 1
    .set CR0_EM, 1 << 2
    .set CR0_TS, 1 << 3
    .set CR0_NE, 1 << 5
    .set CR0_WP, 1 << 16
    .set CR0_PG, 1 << 31
    .set CR4_PAE, 1 << 5
    .set CR4_OSFXSR, 1 << 9
    .set CR4_OSXMMEXCPT, 1 << 10
    .set CR4_OSXSAVE, 1 << 18
    .set CR4_PKE, 1 << 22                   /* rdpkru/wrpkru (bank pkru) #UD without it */
    .set MSR_EFER, 0xC0000080
    .set EFER_LME, 1 << 8
    .set RFLAGS_IOPL3, 3 << 12

/* XCR0 bits the stub may enable by itself: user state only (not 8 PT,
   10 PASID, 11-16 CET/HDC/UINTR/LBR/HWP), and not AMX 17/18 (a bare guest
   could, but no bank needs it and it costs 8 KiB per save). */
    .set XCR0_AUTO_MASK, 0xFFFFFFFF & ~(1 << 8) & ~(1 << 10) & ~(0x3F << 11) & ~(3 << 17)

    .macro DEBUG_CHAR c
    movb    $\c, %al
    outb    %al, $DEBUGCON
    .endm

    .text
/* ---------------------------------------------------------------- header */
mb_header:
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00010000               /* bit 16: address fields valid */
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long IMAGE_BASE                        /* header_addr */
    .long IMAGE_BASE                        /* load_addr */
    .long IMAGE_END                         /* load_end_addr */
    .long BSS_END                           /* bss_end_addr */
    .long IMAGE_BASE + (entry32 - mb_header) /* entry_addr */

/* ------------------------------------------------------- 32-bit entry */
    .code32
entry32:
    /* multiboot: protected mode, paging off, EAX = 0x2BADB002, ESP undefined */
    cli
    movl    $KSTACK_TOP, %esp
    DEBUG_CHAR 'b'
    movl    $1, %eax
    cpuid
    movl    %ecx, BOOTINFO_ADDR + BI_CPUID1_ECX
    btl     $26, %ecx                       /* XSAVE: needed for CR4.OSXSAVE */
    jc      1f
    movl    $BOOT_FAIL_NO_XSAVE, %eax
    jmp     boot_fail32
1:
    lgdt    GDTR_ADDR
    movl    $PML4_ADDR, %eax
    movl    %eax, %cr3
    xorl    %esi, %esi                      /* CR4.PKE where the CPU has PKU, else 0 */
    xorl    %eax, %eax
    cpuid
    cmpl    $7, %eax
    jb      3f
    movl    $7, %eax
    xorl    %ecx, %ecx
    cpuid
    btl     $3, %ecx                        /* CPUID.(7,0):ECX[3] PKU */
    jnc     3f
    movl    $CR4_PKE, %esi
3:
    movl    %cr4, %eax
    orl     $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE), %eax
    orl     %esi, %eax
    movl    %eax, %cr4
    movl    $MSR_EFER, %ecx
    rdmsr
    orl     $EFER_LME, %eax
    wrmsr
    movl    %cr0, %eax
    andl    $~(CR0_EM | CR0_TS), %eax
    orl     $(CR0_PE | CR0_MP | CR0_NE | CR0_WP | CR0_PG), %eax
    movl    %eax, %cr0
    ljmp    $KCODE, $(IMAGE_BASE + (entry64 - mb_header))

boot_fail32:                                /* %eax = status */
    movl    %eax, BOOTINFO_ADDR + BI_FAIL
    movl    %eax, %edx
    DEBUG_CHAR 'X'
    movl    %edx, %eax
2:  outb    %al, $DEBUG_EXIT
    hlt
    jmp     2b

/* ------------------------------------------------------- 64-bit code */
    .code64
entry64:
    movl    $KDATA, %eax
    movl    %eax, %ds
    movl    %eax, %es
    movl    %eax, %ss
    xorl    %eax, %eax
    movl    %eax, %fs
    movl    %eax, %gs
    movq    $KSTACK_TOP, %rsp
    DEBUG_CHAR 'l'
    movl    $TSS_SEL, %eax
    ltr     %ax

    /* Record CPUID leaf 0xD for the host: the XSAVE layout of this guest's CPU. */
    xorl    %esi, %esi
3:  movl    $0xD, %eax
    movl    %esi, %ecx
    cpuid
    movl    %esi, %r8d
    shll    $4, %r8d
    movl    %eax, BOOTINFO_ADDR + BI_LEAF_D + 0(%r8)
    movl    %ebx, BOOTINFO_ADDR + BI_LEAF_D + 4(%r8)
    movl    %ecx, BOOTINFO_ADDR + BI_LEAF_D + 8(%r8)
    movl    %edx, BOOTINFO_ADDR + BI_LEAF_D + 12(%r8)
    incl    %esi
    cmpl    $LEAF_D_COUNT, %esi
    jb      3b

    /* XCR0: PARAM_XCR0, or every user component CPUID.(0xD,0) offers. */
    movl    BOOTINFO_ADDR + BI_LEAF_D + 0, %eax     /* supported XCR0[31:0] */
    movl    BOOTINFO_ADDR + BI_LEAF_D + 12, %edx    /* supported XCR0[63:32] */
    shlq    $32, %rdx
    orq     %rax, %rdx                              /* %rdx = supported */
    movq    PARAMS_ADDR + PARAM_XCR0, %rax
    testq   %rax, %rax
    jnz     4f
    movl    $XCR0_AUTO_MASK, %eax
    andq    %rdx, %rax
4:  movq    %rax, %rcx
    notq    %rdx
    testq   %rdx, %rcx                              /* asked for unsupported bits? */
    jz      5f
    movl    $BOOT_FAIL_XCR0, %eax
    jmp     boot_fail64
5:  movq    %rax, BOOTINFO_ADDR + BI_XCR0
    movq    %rax, %rdx
    shrq    $32, %rdx
    xorl    %ecx, %ecx
    xsetbv
    movl    $BOOTINFO_MAGIC, BOOTINFO_ADDR + BI_MAGIC
    DEBUG_CHAR 'u'

    /* iretq to the payload at CPL3: SS, RSP, RFLAGS (IOPL 3), CS, RIP. */
    pushq   $UDATA
    pushq   $USTACK_TOP
    pushq   $(RFLAGS_IOPL3 | 0x2)
    pushq   $UCODE
    pushq   $PAYLOAD_ADDR
    movq    PARAMS_ADDR + PARAM_MAILBOX, %rdi
    xorl    %eax, %eax
    xorl    %ebx, %ebx
    xorl    %ecx, %ecx
    xorl    %edx, %edx
    xorl    %esi, %esi
    xorl    %ebp, %ebp
    xorl    %r8d, %r8d
    iretq

boot_fail64:                                /* %eax = status */
    movl    %eax, BOOTINFO_ADDR + BI_FAIL
    movl    %eax, %edx
    DEBUG_CHAR 'X'
    movl    %edx, %eax
6:  outb    %al, $DEBUG_EXIT
    hlt
    jmp     6b

/* ------------------------------------------------------- tables */
    .org GDT_ADDR - IMAGE_BASE
gdt:
    .quad 0                                 /* 0x00 null */
    .quad 0                                 /* 0x08 unused */
    .quad 0x00AF9A000000FFFF                /* 0x10 kernel code64, DPL0 */
    .quad 0x00CF92000000FFFF                /* 0x18 kernel data, DPL0 */
    .quad 0x00CFFA000000FFFF                /* 0x20 user code32, DPL3 (unused) */
    .quad 0x00CFF2000000FFFF                /* 0x28 user data, DPL3 */
    .quad 0x00AFFA000000FFFF                /* 0x30 user code64, DPL3 */
    .quad 0                                 /* 0x38 unused */
    /* 0x40 64-bit TSS descriptor (16 bytes): limit 0x67, type 9, present */
    .quad TSS_LIMIT | ((TSS_ADDR & 0xFFFFFF) << 16) | (0x89 << 40) | (((TSS_ADDR >> 24) & 0xFF) << 56)
    .quad TSS_ADDR >> 32
gdt_end:

    .org GDTR_ADDR - IMAGE_BASE
    .word gdt_end - gdt - 1
    .long GDT_ADDR

    .org TSS_ADDR - IMAGE_BASE
    .long 0                                 /* reserved */
    .quad KSTACK_TOP                        /* rsp0 */
    .quad 0, 0                              /* rsp1, rsp2 */
    .quad 0                                 /* reserved */
    .quad 0, 0, 0, 0, 0, 0, 0               /* ist1..7 */
    .quad 0                                 /* reserved */
    .word 0
    .word TSS_IOMAP - TSS_ADDR              /* I/O permission bitmap offset */
    /* I/O permission bitmap for ports 0..255, then the 0xFF terminator: only
       DEBUGCON and DEBUG_EXIT are allowed (bit clear) at CPL3 with IOPL < 3. */
    .org TSS_IOMAP - IMAGE_BASE
    .set port, 0
    .rept 32
    .byte 0xFF & ~(((((DEBUGCON >> 3) == port) & 1) << (DEBUGCON & 7)) | ((((DEBUG_EXIT >> 3) == port) & 1) << (DEBUG_EXIT & 7)))
    .set port, port + 1
    .endr
    .byte 0xFF

    .org PARAMS_ADDR - IMAGE_BASE
    .long PARAMS_MAGIC
    .long 0
    .quad 0                                 /* PARAM_MAILBOX */
    .quad 0                                 /* PARAM_XCR0 */

/* Page tables: PML4[0] -> PDPT[0] -> PD: 512 x 2 MiB, present, writable, user. */
    .set PTE_FLAGS, 0x7                     /* P | RW | US */
    .org PML4_ADDR - IMAGE_BASE
    .quad PDPT_ADDR | PTE_FLAGS
    .org PDPT_ADDR - IMAGE_BASE
    .quad PD_ADDR | PTE_FLAGS
    .org PD_ADDR - IMAGE_BASE
    .set page, 0
    .rept 512
    .quad (page << 21) | PTE_FLAGS | 0x80   /* PS: 2 MiB page */
    .set page, page + 1
    .endr
    .org PAYLOAD_ADDR - IMAGE_BASE
stub_end:
