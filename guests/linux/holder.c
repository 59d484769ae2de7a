/*
 * holder.c - the Linux guest's register holder (/bin/apx-holder).
 *
 *   apx-holder BANK [--load S] [--expect S] [--spin-ms N] [--yield] [--cpu N]
 *              [--release PATH] [--result-fd N]
 *
 * Loads BANK with the host's pattern for stage S (apx_tests.xsave: bank.pattern(S),
 * compiled in from the generated holder_banks.h), prints, from inside the hold
 * function right after the load,
 *
 *     apx-holder: ready bank=BANK pid=N load=S expect=E yield=0|1 spin_ms=M spin=0xA-0xB
 *
 * on stdout (the console; 0xA-0xB: the spin loop's addresses), and spins with the
 * registers live until a TSC deadline M ms away (the guest TSC stands still while
 * QEMU TCG is stopped) or until the u32 at the start of PATH (a shared mapping)
 * becomes non-zero; then it stores the bank and compares it with the pattern for
 * stage E.  The verdict is one line, written to
 * --result-fd (a pipe from /init), or without that option to stdout as
 * "apx-holder: done bank=B pid=N: VERDICT":
 *
 *     ok spins=N
 *     not ok ymm ymm13 byte 21: want 0x8d got 0xd7 (1 differing byte, spins=N)
 *     skip CPU lacks AVX (CPUID.1:ECX[28]=0)
 *     error <why>
 *
 * Exit status: 0 ok, 1 mismatch, 2 skipped (bank unavailable), 3 usage or error.
 * See docs/linux-guests.md.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct apx_cpuid_need {
    uint32_t leaf, subleaf, reg, bit; /* reg: 0 eax, 1 ebx, 2 ecx, 3 edx */
    const char *what;                 /* "AVX (CPUID.1:ECX[28]=0)" */
};

struct apx_bank_desc {
    const char *name;
    unsigned nregs, width, size;
    uint64_t xcr0_mask;
    const char *const *regs;
    const struct apx_cpuid_need *needs;
    unsigned nneeds;
    const uint8_t *load;   /* [APX_STAGES][size], stage s at s*size */
    const uint8_t *expect; /* the same, or a deliberately wrong copy */
    void (*hold)(void *block);
    const char *spin_start, *spin_end; /* the spin loop inside hold */
};

#include "holder_banks.h" /* generated: APX_STAGES, apx_banks[], apx_nbanks */

/* Must match the HB_* offsets in hold.S. */
struct hold_block {
    uint64_t deadline;
    uint64_t release;
    uint32_t yield;
    uint32_t ready_len;
    uint64_t ready_buf;
    uint64_t spins;
    uint8_t pad[0x1000 - 0x28];
    uint8_t load[0x1000];
    uint8_t store[0x1000];
};
_Static_assert(__builtin_offsetof(struct hold_block, deadline) == 0x00, "HB_DEADLINE");
_Static_assert(__builtin_offsetof(struct hold_block, release) == 0x08, "HB_RELEASE");
_Static_assert(__builtin_offsetof(struct hold_block, yield) == 0x10, "HB_YIELD");
_Static_assert(__builtin_offsetof(struct hold_block, ready_len) == 0x14, "HB_READY_LEN");
_Static_assert(__builtin_offsetof(struct hold_block, ready_buf) == 0x18, "HB_READY_BUF");
_Static_assert(__builtin_offsetof(struct hold_block, spins) == 0x20, "HB_SPINS");
_Static_assert(__builtin_offsetof(struct hold_block, load) == 0x1000, "LOAD_AREA");
_Static_assert(__builtin_offsetof(struct hold_block, store) == 0x2000, "STORE_AREA");

static struct hold_block block __attribute__((aligned(4096)));
static volatile uint32_t never_released;
static int result_fd = -1;
static const char *bank_name = "?";

static void out(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out(int fd, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof buf)
        n = sizeof buf - 1;
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        memmove(buf, buf + w, n - w);
        n -= w;
    }
}

/* One verdict: "ok ...", "not ok ...", "skip ..." or "error ...", to the console
 * (prefixed) and to the result pipe (bare). */
static int verdict(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int verdict(int status, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (result_fd >= 0)
        out(result_fd, "%s\n", msg);
    else
        out(1, "apx-holder: done bank=%s pid=%d: %s\n", bank_name, (int)getpid(), msg);
    return status;
}

static uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t)hi << 32 | lo;
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* TSC ticks per millisecond, measured against CLOCK_MONOTONIC over ~10 ms
 * (vDSO, no sleeping: the guest may have one CPU and nothing else to run). */
static double tsc_per_ms(void)
{
    double t0 = now_ns();
    uint64_t c0 = rdtsc();
    double t1;
    do
        t1 = now_ns();
    while (t1 - t0 < 10e6);
    uint64_t c1 = rdtsc();
    return (c1 - c0) / ((t1 - t0) / 1e6);
}

/* NULL when the bank can be used here, else why not. */
static const char *unavailable(const struct apx_bank_desc *b)
{
    static char why[300];
    uint32_t r[4], max_leaf = __get_cpuid_max(0, NULL), leaf7_max = 0;
    if (max_leaf >= 7) {
        __cpuid_count(7, 0, r[0], r[1], r[2], r[3]);
        leaf7_max = r[0];
    }
    for (unsigned i = 0; i < b->nneeds; i++) {
        const struct apx_cpuid_need *n = &b->needs[i];
        int have = 0;
        if (n->leaf <= max_leaf && (n->leaf != 7 || n->subleaf <= leaf7_max)) {
            __cpuid_count(n->leaf, n->subleaf, r[0], r[1], r[2], r[3]);
            have = r[n->reg] >> n->bit & 1;
        }
        if (!have) {
            snprintf(why, sizeof why, "CPU lacks %s", n->what);
            return why;
        }
    }
    __cpuid(1, r[0], r[1], r[2], r[3]);
    uint64_t xcr0 = (r[2] >> 27 & 1) ? xgetbv0() : 0x3; /* no OSXSAVE: x87 + SSE via FXSAVE */
    if (b->xcr0_mask & ~xcr0) {
        snprintf(why, sizeof why, "XCR0 %#llx lacks %#llx (the kernel does not enable the %s state)",
                 (unsigned long long)xcr0, (unsigned long long)(b->xcr0_mask & ~xcr0), b->name);
        return why;
    }
    return NULL;
}

static int usage(const char *msg)
{
    return verdict(3, "error %s (usage: apx-holder BANK [--load S] [--expect S] [--spin-ms N] "
                      "[--yield] [--cpu N] [--release PATH] [--result-fd N])", msg);
}

static int stage_arg(const char *s, int *out_stage)
{
    char *end;
    long v = strtol(s, &end, 0);
    if (*s == 0 || *end || v < 0 || v >= APX_STAGES)
        return -1;
    *out_stage = (int)v;
    return 0;
}

int main(int argc, char **argv)
{
    int load = 1, expect = -1, yield = 0, cpu = -1;
    long spin_ms = 300;
    const char *release = NULL;

    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2)
        return usage("no bank given");
    bank_name = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--yield")) {
            yield = 1;
            continue;
        }
        if (!v)
            return usage("option needs a value");
        i++;
        if (!strcmp(a, "--load")) {
            if (stage_arg(v, &load))
                return usage("bad --load stage");
        } else if (!strcmp(a, "--expect")) {
            if (stage_arg(v, &expect))
                return usage("bad --expect stage");
        } else if (!strcmp(a, "--spin-ms")) {
            spin_ms = strtol(v, NULL, 0);
        } else if (!strcmp(a, "--cpu")) {
            cpu = atoi(v);
        } else if (!strcmp(a, "--release")) {
            release = v;
        } else if (!strcmp(a, "--result-fd")) {
            result_fd = atoi(v);
        } else {
            return usage("unknown option");
        }
    }
    if (expect < 0)
        expect = load;

    const struct apx_bank_desc *b = NULL;
    for (unsigned i = 0; i < apx_nbanks; i++)
        if (!strcmp(apx_banks[i].name, bank_name))
            b = &apx_banks[i];
    if (!b)
        return verdict(3, "error no bank %s in this holder", bank_name);
    const char *why = unavailable(b);
    if (why)
        return verdict(2, "skip %s", why);

    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set))
            return verdict(3, "error sched_setaffinity(cpu %d): %s", cpu, strerror(errno));
    }
    block.release = (uint64_t)(uintptr_t)&never_released;
    if (release) {
        int fd = open(release, O_RDONLY);
        void *p = fd < 0 ? MAP_FAILED : mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED)
            return verdict(3, "error cannot map release flag %s: %s", release, strerror(errno));
        block.release = (uint64_t)(uintptr_t)p;
    }

    char ready[160];
    int n = snprintf(ready, sizeof ready,
                     "apx-holder: ready bank=%s pid=%d load=%d expect=%d yield=%d spin_ms=%ld spin=%p-%p\n",
                     b->name, (int)getpid(), load, expect, yield, spin_ms, (void *)b->spin_start,
                     (void *)b->spin_end);
    block.ready_buf = (uint64_t)(uintptr_t)ready;
    block.ready_len = (uint32_t)n;
    block.yield = yield;
    memcpy(block.load, b->load + (size_t)load * b->size, b->size);
    memset(block.store, 0, b->size);

    double rate = tsc_per_ms(); /* ~10 ms: before reading the start time */
    block.deadline = rdtsc() + (uint64_t)(spin_ms * rate);
    b->hold(&block); /* load, print ready, spin, store */

    const uint8_t *want = b->expect + (size_t)expect * b->size;
    for (unsigned off = 0; off < b->size; off++) {
        if (block.store[off] == want[off])
            continue;
        unsigned differ = 0;
        for (unsigned k = off; k < b->size; k++)
            differ += block.store[k] != want[k];
        return verdict(1, "not ok %s %s byte %u: want 0x%02x got 0x%02x (%u differing byte%s, spins=%llu)",
                       b->name, b->regs[off / b->width], off % b->width, want[off], block.store[off],
                       differ, differ == 1 ? "" : "s", (unsigned long long)block.spins);
    }
    return verdict(0, "ok spins=%llu", (unsigned long long)block.spins);
}
