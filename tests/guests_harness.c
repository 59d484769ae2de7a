/*
 * guests_harness.c - run a guest payload as an ordinary Linux process, with
 * this program standing in for the VMM.  Used by tests/test_guests_userspace.py
 * to execute the payloads' sync and compare code for real on banks the build
 * machine's CPU has (xmm, ymm, x87; AVX-512 and APX where present).
 *
 * A process runs at CPL3 with IOPL 0, so the payload's "out" raises #GP and
 * the kernel delivers SIGSEGV: the handler emulates the two ports.
 *   port 0xE9 (sync): log the character; release stages 0 and 2 at once.
 *     Stage 1 is released by a helper thread after a pause, which also checks
 *     that the guest really waited (nothing stored, no status) meanwhile.
 *   port 0xF4 (exit): write the mailbox to OUT, print the log, exit(status).
 * The kernel saves and restores all register state around a signal handler,
 * so the bank survives the emulated exits just as it survives a VM exit.
 *
 * Before running the payload, the harness asks CPUID and XGETBV whether the
 * bank is there: when a feature bit or an XCR0 bit the bank needs is clear it
 * exits 77 naming every missing bit, and the payload never runs.  A SIGILL
 * after that check said the bank is enabled is a failure (105), not a skip.
 *
 * usage: guests_harness PAYLOAD.bin MAILBOX_IN OUT BANK
 * exit:  the status the payload reported (1 ok, 2 mismatch); 77 when CPUID or
 *        XCR0 says the bank is absent (the bits on stderr); 105 SIGILL although
 *        the bank is enabled; >= 100 other harness errors.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#define MAILBOX_SIZE 0x4000
#define OFF_STAGE 0x04
#define OFF_GO 0x08
#define OFF_STATUS 0x0C
#define OFF_BANK_BYTES 0x14
#define STORE_AREA 0x3000
#define SYNC_PORT 0xE9
#define EXIT_PORT 0xF4

static volatile uint32_t *mailbox_u32;
static uint8_t *mailbox;
static const char *out_path;
static char sync_log[64];
static volatile int sync_log_len;
static volatile int waited_at_stage1 = -1; /* 1: guest held still, 0: it did not */

static void die(const char *msg, int code)
{
    (void)!write(2, msg, strlen(msg));
    _exit(code);
}

static void load_file(const char *path, void *dst, size_t max, size_t *len)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die("harness: cannot open input\n", 100);
    ssize_t n = read(fd, dst, max);
    close(fd);
    if (n <= 0)
        die("harness: empty input\n", 100);
    if (len)
        *len = (size_t)n;
}

static void finish(int status)
{
    int fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, mailbox, MAILBOX_SIZE) != MAILBOX_SIZE)
        die("harness: cannot write mailbox\n", 101);
    close(fd);
    char line[128];
    int n = snprintf(line, sizeof line, "log=%.*s waited=%d\n", sync_log_len, sync_log, waited_at_stage1);
    (void)!write(1, line, n);
    _exit(status);
}

static void on_sigsegv(int sig, siginfo_t *info, void *context)
{
    ucontext_t *uc = context;
    const uint8_t *rip = (const uint8_t *)uc->uc_mcontext.gregs[REG_RIP];
    (void)sig, (void)info;
    if (rip[0] != 0xE6) /* out imm8, %al: the only fault a payload should take */
        die("harness: payload faulted, not at an out instruction\n", 102);
    uint8_t port = rip[1], al = uc->uc_mcontext.gregs[REG_RAX] & 0xFF;
    if (port == EXIT_PORT)
        finish(al);
    if (port != SYNC_PORT)
        die("harness: out to an unknown port\n", 103);
    if (sync_log_len < (int)sizeof sync_log)
        sync_log[sync_log_len++] = (char)al;
    uint32_t stage = mailbox_u32[OFF_STAGE / 4];
    if (stage != (uint32_t)(al - '0'))
        die("harness: sync character does not match the stage in the mailbox\n", 104);
    if (stage != 1)
        mailbox_u32[OFF_GO / 4] = stage;
    uc->uc_mcontext.gregs[REG_RIP] += 2; /* step over the out */
}

/* ---- is the bank there?  CPUID bits and XCR0 bits per bank (docs/guests.md) ---- */

struct cpuid_bit {
    unsigned leaf, subleaf;
    char reg;         /* 'b', 'c' or 'd' */
    unsigned bit;
    const char *name;
};

static const struct cpuid_bit FPU = {1, 0, 'd', 0, "FPU"}, SSE = {1, 0, 'd', 25, "SSE"},
    SSE2 = {1, 0, 'd', 26, "SSE2"}, OSXSAVE = {1, 0, 'c', 27, "OSXSAVE"}, AVX = {1, 0, 'c', 28, "AVX"},
    AVX512F = {7, 0, 'b', 16, "AVX512F"}, AVX512BW = {7, 0, 'b', 30, "AVX512BW"},
    APX_F = {7, 1, 'd', 21, "APX_F"}, PKU = {7, 0, 'c', 3, "PKU"}, OSPKE = {7, 0, 'c', 4, "OSPKE"};

struct bank_need {
    const char *bank;
    const struct cpuid_bit *bits[5];
    uint64_t xcr0;    /* XCR0 bits the bank needs (0: none, legacy state) */
};

static const struct bank_need NEEDS[] = {
    {"x87", {&FPU}, 0},
    {"xmm", {&SSE, &SSE2}, 0},
    {"ymm", {&OSXSAVE, &AVX}, 0x7},
    {"zmm_hi256", {&OSXSAVE, &AVX, &AVX512F}, 0xE7},
    {"hi16_zmm", {&OSXSAVE, &AVX, &AVX512F}, 0xE7},
    {"opmask", {&OSXSAVE, &AVX, &AVX512F, &AVX512BW}, 0xE7},
    {"apx", {&OSXSAVE, &APX_F}, 1ull << 19},
    {"pkru", {&OSXSAVE, &PKU, &OSPKE}, 0x203},  /* rdpkru/wrpkru need CR4.PKE: OSPKE */
};

static const char *XCR0_NAMES[20] = {"x87", "sse", "avx", "bndregs", "bndcsr", "opmask", "zmm_hi256",
                                     "hi16_zmm", "pt", "pkru", [19] = "apx"};
static const struct bank_need *bank_need;
static char bank_facts[512];

static int cpuid_has(const struct cpuid_bit *b)
{
    unsigned a, bx, c, d, max = __get_cpuid_max(0, NULL);
    if (b->leaf > max)
        return 0;
    __cpuid_count(b->leaf, b->subleaf, a, bx, c, d);
    unsigned r = b->reg == 'b' ? bx : b->reg == 'c' ? c : d;
    return r >> b->bit & 1;
}

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t)hi << 32 | lo;
}

/* 1: CPUID and XCR0 say the bank is enabled; 0: absent, `why` names every missing bit. */
static int bank_enabled(const struct bank_need *need, char *why, size_t size)
{
    size_t n = 0;
    why[0] = 0;
    for (int i = 0; i < 5 && need->bits[i]; i++) {
        const struct cpuid_bit *b = need->bits[i];
        if (!cpuid_has(b))
            n += snprintf(why + n, n < size ? size - n : 0, "%sCPUID.(EAX=%#x,ECX=%u):E%cX[%u] (%s)=0",
                          n ? "; " : "", b->leaf, b->subleaf, b->reg - 'a' + 'A', b->bit, b->name);
    }
    if (need->xcr0 && cpuid_has(&OSXSAVE)) {
        uint64_t xcr0 = xgetbv0(), missing = need->xcr0 & ~xcr0;
        for (int bit = 0; bit < 20; bit++)
            if (missing >> bit & 1)
                n += snprintf(why + n, n < size ? size - n : 0, "%sXCR0 %#llx lacks bit %d (%s)", n ? "; " : "",
                              (unsigned long long)xcr0, bit, XCR0_NAMES[bit] ? XCR0_NAMES[bit] : "?");
    }
    return n == 0;
}

static void on_sigill(int sig, siginfo_t *info, void *context)
{
    (void)sig, (void)context;
    char line[700];
    int n = snprintf(line, sizeof line, "harness: SIGILL at %p, yet bank %s is enabled (%s)\n",
                     info->si_addr, bank_need->bank, bank_facts);
    (void)!write(2, line, n);
    _exit(105);
}

static void *release_stage1(void *unused)
{
    (void)unused;
    while (sync_log_len < 2 || mailbox_u32[OFF_STAGE / 4] != 1)
        usleep(100);
    usleep(20000); /* long enough for a guest that does not wait to run ahead */
    int untouched = mailbox_u32[OFF_STATUS / 4] == 0;
    uint32_t bank_bytes = mailbox_u32[OFF_BANK_BYTES / 4];
    for (uint32_t i = 0; i < bank_bytes && i < 0x1000; i++)
        untouched &= mailbox[STORE_AREA + i] == 0;
    waited_at_stage1 = untouched;
    __atomic_store_n(&mailbox_u32[OFF_GO / 4], 1, __ATOMIC_SEQ_CST);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5)
        die("usage: guests_harness PAYLOAD.bin MAILBOX_IN OUT BANK\n", 100);
    out_path = argv[3];
    for (size_t i = 0; i < sizeof NEEDS / sizeof NEEDS[0]; i++)
        if (strcmp(NEEDS[i].bank, argv[4]) == 0)
            bank_need = &NEEDS[i];
    if (!bank_need)
        die("harness: unknown bank\n", 100);
    char why[512];
    if (!bank_enabled(bank_need, why, sizeof why)) {
        char line[600];
        int n = snprintf(line, sizeof line, "harness: bank %s not enabled: %s\n", bank_need->bank, why);
        (void)!write(2, line, n);
        return 77;
    }
    if (bank_need->xcr0)
        snprintf(bank_facts, sizeof bank_facts, "CPUID and XCR0 %#llx say so", (unsigned long long)xgetbv0());
    else
        snprintf(bank_facts, sizeof bank_facts, "CPUID says so");

    uint8_t *code = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mailbox = mmap(NULL, MAILBOX_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED || mailbox == MAP_FAILED)
        die("harness: mmap failed\n", 100);
    mailbox_u32 = (volatile uint32_t *)mailbox;
    load_file(argv[1], code, 1 << 16, NULL);
    load_file(argv[2], mailbox, MAILBOX_SIZE, NULL);

    struct sigaction sa = {0};
    sa.sa_sigaction = on_sigsegv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    struct sigaction ill = {0};
    ill.sa_sigaction = on_sigill;
    ill.sa_flags = SA_SIGINFO;
    sigaction(SIGILL, &ill, NULL);

    pthread_t helper;
    if (pthread_create(&helper, NULL, release_stage1, NULL))
        die("harness: pthread_create failed\n", 100);

    /* Enter at the first byte with %rdi = mailbox and a 16-byte aligned stack. */
    __asm__ volatile("and $-16, %%rsp\n\tjmp *%1" : : "D"(mailbox), "r"(code) : "memory");
    __builtin_unreachable();
}
