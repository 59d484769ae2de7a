/*
 * pkru.S - bank "pkru": the protection-key rights register PKRU, 4 bytes
 * (XSAVE component 9, of whose 8 bytes the upper 4 are reserved).
 * LOAD/STORE layout: PKRU at +0.
 *
 * wrpkru and rdpkru are user-mode instructions, but #UD unless CR4.PKE is
 * set: the KVM micro-VMM sets it for this bank, the QEMU boot stub wherever
 * the CPU has PKU, Linux wherever it enables protection keys.  wrpkru needs
 * ECX = EDX = 0 and takes EAX; rdpkru needs ECX = 0 and returns EAX (EDX = 0).
 * The host's patterns keep bits 0-1 (access/write disable for key 0, the key
 * of every page the payload touches) clear, so the guest can still reach its
 * mailbox after the load.
 */
    .include "common.S"

    .macro bank_load
    xorl    %ecx, %ecx
    xorl    %edx, %edx
    movl    LOAD_AREA(%rdi), %eax
    wrpkru
    .endm

    .macro bank_store
    xorl    %ecx, %ecx
    rdpkru
    movl    %eax, STORE_AREA(%rdi)
    .endm

    PAYLOAD
