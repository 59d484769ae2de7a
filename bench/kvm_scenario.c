/*
 * kvm_scenario.c - the C reference for the Python `import` scenario (apx_tests.scenarios),
 * one bank, timed per iteration.  ci/bench compiles it with gcc -O2 into a temp dir.
 *
 * Per iteration it does what KvmSession + MicroVm (apx_tests/kvm/vmm.py) do for `import`:
 *   mmap 4 MiB guest RAM, KVM_CREATE_VM, KVM_SET_TSS_ADDR, KVM_SET_USER_MEMORY_REGION,
 *   KVM_CREATE_VCPU, mmap the run area, KVM_SET_CPUID2, page tables + GDT/TSS + payload +
 *   mailbox header, KVM_GET_SREGS/KVM_SET_SREGS (CPL3 long mode), KVM_SET_XCRS,
 *   KVM_SET_REGS, KVM_RUN to sync 0, KVM_GET_XSAVE2 (baseline), write LOAD, release 0,
 *   KVM_RUN to sync 1, KVM_GET_XSAVE2, write the IMPORTED values at the bank's byte offsets,
 *   KVM_SET_XSAVE, write EXPECT, release 1, KVM_RUN to sync 2, check status/mismatch and
 *   STORE == EXPECT, release 2, KVM_RUN to the final port 0xF4 write (status ok), close.
 * Each KVM_RUN is bracketed by setitimer() like MicroVm._run_once's SIGALRM timeout.
 *
 * Done once before timing (as KvmHost does): open /dev/kvm, KVM_GET_SUPPORTED_CPUID,
 * supported XCR0 (KVM_GET_DEVICE_ATTR KVM_X86_XCOMP_GUEST_SUPP, CPUID 0xD.0 fallback),
 * the CPUID patch of vmm.guest_cpuid, KVM_CAP_XSAVE2 and the vCPU mmap size.
 *
 * Nothing bank-specific is hard-coded: the register byte offsets (from apx_tests.xsave and
 * the layout KVM advertises), the patterns and the component init values come from the
 * table file that ci/bench writes.  Format, one item per line ('#' comments):
 *   bank NAME | bank_bytes N | xsave_size N | guest_xcr0 X | xstate_bv_offset N
 *   component NUMBER OFFSET SIZE INIT_HEX|- KEEP_LO KEEP_HI   (init = INIT_HEX then zeros;
 *                                                  bytes [KEEP_LO,KEEP_HI) stay literal)
 *   reg NAME OFF:SIZE [OFF:SIZE...]    (absolute offsets in the standard-format image)
 *   load HEX | import HEX              (packed bank values: LOAD area, imported/EXPECT)
 *
 * Output: one JSON object on stdout (times in ms).  Any failure: exit 1 and exactly one
 * line on stderr "kvm_scenario: ..."; usage errors exit 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* --- the micro-VMM's memory map and constants (apx_tests/kvm/vmm.py) ---------------- */
#define MEMORY_SIZE (4u << 20)
#define PML4 0x1000
#define PDPT 0x2000
#define PD 0x3000
#define GDT 0x4000
#define TSS 0x4800
#define PAYLOAD 0x10000
#define STACK_TOP 0x80000
#define MAILBOX 0x100000
#define TSS_ADDR_FOR_VMX 0xFFFBD000u
#define USER_CS (0x18 | 3)
#define USER_DS (0x20 | 3)
#define TSS_SEL 0x28
#define CR0_BITS (1ull | 1ull << 1 | 1ull << 4 | 1ull << 5 | 1ull << 16 | 1ull << 31)
#define CR4_BITS (1ull << 5 | 1ull << 9 | 1ull << 10 | 1ull << 18)
#define EFER_BITS (1ull << 8 | 1ull << 10)
#define RFLAGS_IOPL3 (3ull << 12)
#define PTE_P 1ull
#define PTE_RW 2ull
#define PTE_US 4ull
#define PTE_PS 0x80ull
static const uint64_t GDT_ENTRIES[5] = {0, 0x00AF9A000000FFFFull, 0x00CF92000000FFFFull,
                                        0x00AFFA000000FFFFull, 0x00CFF2000000FFFFull};
/* apx_tests/kvm/backend.py: user components only, never AMX. */
#define AMX_MASK ((1ull << 17) | (1ull << 18))
#define USER_XCR0_MASK (0xFFFFFFFFull & ~(1ull << 8) & ~(1ull << 10) & ~(0x3Full << 11))

/* --- mailbox (apx_tests/guests/protocol.py) ------------------------------------------ */
#define MAILBOX_SIZE 0x4000
#define MAGIC 0x4D585041u
#define OFF_MAGIC 0x00
#define OFF_STAGE 0x04
#define OFF_GO 0x08
#define OFF_STATUS 0x0C
#define OFF_MISMATCH 0x10
#define OFF_BANK_BYTES 0x14
#define LOAD_AREA 0x1000
#define EXPECT_AREA 0x2000
#define STORE_AREA 0x3000
#define AREA_SIZE 0x1000
#define STATUS_OK 1
#define NO_MISMATCH 0xFFFFFFFFu
#define GO_HOLD 0xFFFFFFFFu
#define SYNC_PORT 0xE9
#define EXIT_PORT 0xF4
#define XSAVE_HEADER_RESERVED_LO 528 /* XSAVE header bytes 16..63 must be zero */
#define XSAVE_HEADER_RESERVED_HI 576
#define XCOMP_BV_OFFSET 520

#define MAX_REGS 64
#define MAX_PIECES 4
#define MAX_COMPONENTS 32

struct piece { unsigned offset, size; };
struct reg { char name[32]; int npieces; struct piece pieces[MAX_PIECES]; unsigned width; };
struct component { int number; unsigned offset, size, keep_lo, keep_hi; uint8_t init[64]; unsigned init_len; };

static struct {
    char bank[32];
    unsigned bank_bytes, xsave_size, xstate_bv_offset;
    uint64_t guest_xcr0;
    int nregs, ncomponents;
    struct reg regs[MAX_REGS];
    struct component components[MAX_COMPONENTS];
    uint8_t load[AREA_SIZE], import[AREA_SIZE];
    unsigned load_len, import_len;
} T;

static int in_loop;   /* for messages: set-up, or which iteration */
static long iteration; /* negative: warm-up */

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *p = msg; *p; p++)
        if (*p == '\n') *p = ' ';
    if (in_loop)
        fprintf(stderr, "kvm_scenario: %s: %s %ld: %s\n", T.bank, iteration < 0 ? "warm-up iteration" : "iteration",
                iteration, msg);
    else
        fprintf(stderr, "kvm_scenario: %s\n", msg);
    exit(1);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *name)
{
    int ret = ioctl(fd, req, arg);
    if (ret < 0) die("%s: %s", name, strerror(errno));
    return ret;
}
#define IOCTL(fd, req, arg) xioctl((fd), (req), (void *)(arg), #req)

/* --- the table file ------------------------------------------------------------------ */
static unsigned parse_hex(const char *hex, uint8_t *out, unsigned cap, const char *what)
{
    size_t n = strlen(hex);
    if (n % 2 || n / 2 > cap) die("table: %s: bad hex (%zu digits, room for %u bytes)", what, n, cap);
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) die("table: %s: bad hex", what);
        out[i] = (uint8_t)v;
    }
    return (unsigned)(n / 2);
}

static void read_table(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) die("%s: %s", path, strerror(errno));
    static char line[16384];
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        else if (!feof(f)) die("%s:%d: line too long", path, lineno);
        char *save, *key = strtok_r(line, " \t", &save);
        if (!key || key[0] == '#') continue;
        char *a = strtok_r(NULL, " \t", &save);
        if (!a) die("%s:%d: %s without a value", path, lineno, key);
        if (!strcmp(key, "bank")) snprintf(T.bank, sizeof T.bank, "%s", a);
        else if (!strcmp(key, "bank_bytes")) T.bank_bytes = strtoul(a, NULL, 0);
        else if (!strcmp(key, "xsave_size")) T.xsave_size = strtoul(a, NULL, 0);
        else if (!strcmp(key, "xstate_bv_offset")) T.xstate_bv_offset = strtoul(a, NULL, 0);
        else if (!strcmp(key, "guest_xcr0")) T.guest_xcr0 = strtoull(a, NULL, 0);
        else if (!strcmp(key, "load")) T.load_len = parse_hex(a, T.load, sizeof T.load, "load");
        else if (!strcmp(key, "import")) T.import_len = parse_hex(a, T.import, sizeof T.import, "import");
        else if (!strcmp(key, "component")) {
            if (T.ncomponents == MAX_COMPONENTS) die("%s:%d: too many components", path, lineno);
            struct component *c = &T.components[T.ncomponents++];
            char *off = strtok_r(NULL, " \t", &save), *size = strtok_r(NULL, " \t", &save);
            char *init = strtok_r(NULL, " \t", &save), *lo = strtok_r(NULL, " \t", &save);
            char *hi = strtok_r(NULL, " \t", &save);
            if (!hi) die("%s:%d: component needs NUMBER OFFSET SIZE INIT LO HI", path, lineno);
            c->number = atoi(a);
            c->offset = strtoul(off, NULL, 0);
            c->size = strtoul(size, NULL, 0);
            c->init_len = strcmp(init, "-") ? parse_hex(init, c->init, sizeof c->init, "component init") : 0;
            c->keep_lo = strtoul(lo, NULL, 0);
            c->keep_hi = strtoul(hi, NULL, 0);
        } else if (!strcmp(key, "reg")) {
            if (T.nregs == MAX_REGS) die("%s:%d: too many registers", path, lineno);
            struct reg *r = &T.regs[T.nregs++];
            snprintf(r->name, sizeof r->name, "%s", a);
            for (char *p; (p = strtok_r(NULL, " \t", &save));) {
                if (r->npieces == MAX_PIECES) die("%s:%d: too many pieces", path, lineno);
                struct piece *pc = &r->pieces[r->npieces++];
                if (sscanf(p, "%u:%u", &pc->offset, &pc->size) != 2) die("%s:%d: bad piece %s", path, lineno, p);
                r->width += pc->size;
            }
        } else die("%s:%d: unknown key %s", path, lineno, key);
    }
    fclose(f);
    if (!T.bank[0] || !T.bank_bytes || !T.xsave_size || !T.xstate_bv_offset || !T.nregs || !T.ncomponents)
        die("%s: incomplete table (need bank, bank_bytes, xsave_size, xstate_bv_offset, component, reg)", path);
    if (T.load_len != T.bank_bytes || T.import_len != T.bank_bytes)
        die("%s: load/import are %u/%u bytes, bank_bytes is %u", path, T.load_len, T.import_len, T.bank_bytes);
    unsigned total = 0;
    for (int i = 0; i < T.nregs; i++) {
        total += T.regs[i].width;
        for (int j = 0; j < T.regs[i].npieces; j++)
            if (T.regs[i].pieces[j].offset + T.regs[i].pieces[j].size > T.xsave_size)
                die("%s: %s lies outside the %u-byte image", path, T.regs[i].name, T.xsave_size);
    }
    if (total != T.bank_bytes) die("%s: registers cover %u bytes, bank_bytes is %u", path, total, T.bank_bytes);
    for (int i = 0; i < T.ncomponents; i++)
        if (T.components[i].offset + T.components[i].size > T.xsave_size)
            die("%s: component %d lies outside the image", path, T.components[i].number);
}

static uint8_t *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) die("%s: %s", path, strerror(errno));
    static uint8_t buf[STACK_TOP - PAYLOAD];
    *len = fread(buf, 1, sizeof buf, f);
    if (ferror(f)) die("%s: read error", path);
    if (!feof(f) || *len > STACK_TOP - PAYLOAD - 0x10000) die("%s: payload too large for the code area", path);
    fclose(f);
    if (*len == 0) die("%s: empty payload", path);
    return buf;
}

/* --- host facts, once (KvmHost) ------------------------------------------------------ */
static int kvm_fd;
static struct kvm_cpuid2 *guest_cpuid;
static uint64_t guest_xcr0;
static unsigned xsave2_size;
static size_t run_size;

static struct kvm_cpuid2 *supported_cpuid(void)
{
    for (unsigned nent = 256;; nent *= 2) {
        struct kvm_cpuid2 *c = calloc(1, sizeof *c + nent * sizeof c->entries[0]);
        if (!c) die("out of memory");
        c->nent = nent;
        if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) == 0) return c;
        int err = errno;
        free(c);
        if (err != E2BIG || nent >= 4096) die("KVM_GET_SUPPORTED_CPUID: %s", strerror(err));
    }
}

static void host_setup(void)
{
    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0) die("/dev/kvm: %s", strerror(errno));
    if (ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) die("/dev/kvm: wrong KVM API version");
    guest_cpuid = supported_cpuid();

    uint64_t supported = 0;
    struct kvm_device_attr attr = {.group = 0 /* KVM_X86_GRP_SYSTEM */, .attr = KVM_X86_XCOMP_GUEST_SUPP,
                                   .addr = (uint64_t)(uintptr_t)&supported};
    if (ioctl(kvm_fd, KVM_GET_DEVICE_ATTR, &attr) < 0) {
        supported = 0;
        for (unsigned i = 0; i < guest_cpuid->nent; i++) {
            struct kvm_cpuid_entry2 *e = &guest_cpuid->entries[i];
            if (e->function == 0xD && e->index == 0) supported = e->eax | (uint64_t)e->edx << 32;
        }
    }
    guest_xcr0 = supported & USER_XCR0_MASK & ~AMX_MASK;
    if (T.guest_xcr0 && T.guest_xcr0 != guest_xcr0)
        die("guest XCR0 %#llx here, the table (KvmHost.guest_cpu) says %#llx",
            (unsigned long long)guest_xcr0, (unsigned long long)T.guest_xcr0);

    /* vmm.guest_cpuid: the feature bits the enabled components need. */
    for (unsigned i = 0; i < guest_cpuid->nent; i++) {
        struct kvm_cpuid_entry2 *e = &guest_cpuid->entries[i];
        if (e->function == 1) {
            e->ecx |= 1u << 26; /* XSAVE */
            if (guest_xcr0 & 0x4) e->ecx |= 1u << 28; /* AVX */
        } else if (e->function == 7 && e->index == 0 && (guest_xcr0 & 0xE0) == 0xE0) {
            e->ebx |= (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);
        } else if (e->function == 7 && e->index == 1 && (guest_xcr0 & (1ull << 19))) {
            e->edx |= 1u << 21; /* APX_F */
        }
    }

    int size = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
    xsave2_size = size > 0 ? (unsigned)size : sizeof(struct kvm_xsave);
    if (xsave2_size > 1u << 16) die("KVM_CAP_XSAVE2 is %u bytes, this program's buffers hold 64 KiB", xsave2_size);
    if (xsave2_size != T.xsave_size)
        die("KVM_CAP_XSAVE2 is %u bytes here, the table says %u", xsave2_size, T.xsave_size);
    int mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size <= 0) die("KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
    run_size = (size_t)mmap_size;
}

/* --- one VM (MicroVm) ---------------------------------------------------------------- */
struct vm {
    uint8_t *mem;
    int vm_fd, vcpu_fd;
    struct kvm_run *run;
    int last_stage;
};

static void on_alarm(int sig) { (void)sig; }

static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static void set_segment(struct kvm_segment *s, uint16_t sel, uint8_t type, int long_mode)
{
    s->base = 0; s->limit = 0xFFFFFFFF; s->selector = sel; s->type = type;
    s->present = 1; s->dpl = 3; s->s = 1; s->g = 1; s->avl = 0; s->unusable = 0;
    s->l = long_mode ? 1 : 0; s->db = long_mode ? 0 : 1;
}

static void vm_create(struct vm *vm)
{
    vm->mem = mmap(NULL, MEMORY_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (vm->mem == MAP_FAILED) die("mmap guest memory: %s", strerror(errno));
    vm->vm_fd = IOCTL(kvm_fd, KVM_CREATE_VM, 0);
    IOCTL(vm->vm_fd, KVM_SET_TSS_ADDR, (uintptr_t)TSS_ADDR_FOR_VMX);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEMORY_SIZE, .userspace_addr = (uintptr_t)vm->mem};
    IOCTL(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region);
    vm->vcpu_fd = IOCTL(vm->vm_fd, KVM_CREATE_VCPU, 0);
    vm->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_fd, 0);
    if (vm->run == MAP_FAILED) die("mmap kvm_run: %s", strerror(errno));
    IOCTL(vm->vcpu_fd, KVM_SET_CPUID2, guest_cpuid);
    vm->last_stage = -1;
}

static void vm_boot(struct vm *vm, const uint8_t *code, size_t code_len)
{
    uint8_t *m = vm->mem;
    put64(m + PML4, PDPT | PTE_P | PTE_RW | PTE_US);
    put64(m + PDPT, PD | PTE_P | PTE_RW | PTE_US);
    for (unsigned i = 0; i < MEMORY_SIZE >> 21; i++)
        put64(m + PD + 8 * i, ((uint64_t)i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS);
    for (int i = 0; i < 5; i++) put64(m + GDT + 8 * i, GDT_ENTRIES[i]);
    uint64_t tss_low = 0x67 | ((uint64_t)(TSS & 0xFFFFFF) << 16) | (0x89ull << 40) | ((uint64_t)((TSS >> 24) & 0xFF) << 56);
    put64(m + GDT + 40, tss_low);
    put64(m + GDT + 48, (uint64_t)TSS >> 32);
    memcpy(m + PAYLOAD, code, code_len);
    /* protocol.pack_mailbox_header(bank_bytes=bank.size) */
    uint8_t *mb = m + MAILBOX;
    put32(mb + OFF_MAGIC, MAGIC);
    put32(mb + OFF_STAGE, 0);
    put32(mb + OFF_GO, GO_HOLD);
    put32(mb + OFF_STATUS, 0);
    put32(mb + OFF_MISMATCH, 0);
    put32(mb + OFF_BANK_BYTES, T.bank_bytes);

    struct kvm_sregs sregs;
    IOCTL(vm->vcpu_fd, KVM_GET_SREGS, &sregs);
    set_segment(&sregs.cs, USER_CS, 0xB, 1);
    set_segment(&sregs.ds, USER_DS, 0x3, 0);
    set_segment(&sregs.es, USER_DS, 0x3, 0);
    set_segment(&sregs.fs, USER_DS, 0x3, 0);
    set_segment(&sregs.gs, USER_DS, 0x3, 0);
    set_segment(&sregs.ss, USER_DS, 0x3, 0);
    sregs.tr.base = TSS; sregs.tr.limit = 0x67; sregs.tr.selector = TSS_SEL;
    sregs.tr.type = 0xB; sregs.tr.present = 1; sregs.tr.s = 0; sregs.tr.dpl = 0; sregs.tr.unusable = 0;
    sregs.ldt.unusable = 1; sregs.ldt.present = 0; sregs.ldt.type = 2;
    sregs.gdt.base = GDT; sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0; sregs.idt.limit = 0;
    sregs.cr0 = CR0_BITS;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_BITS;
    sregs.efer = EFER_BITS;
    IOCTL(vm->vcpu_fd, KVM_SET_SREGS, &sregs);

    struct kvm_xcrs xcrs;
    memset(&xcrs, 0, sizeof xcrs);
    xcrs.nr_xcrs = 1;
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = guest_xcr0;
    IOCTL(vm->vcpu_fd, KVM_SET_XCRS, &xcrs);

    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = PAYLOAD; regs.rsp = STACK_TOP; regs.rdi = MAILBOX;
    regs.rflags = RFLAGS_IOPL3 | 0x2;
    IOCTL(vm->vcpu_fd, KVM_SET_REGS, &regs);
}

enum { EV_SYNC, EV_DONE };

/* MicroVm.run: KVM_RUN until a sync or the final port write; anything else fails. */
static int vm_run(struct vm *vm, int *value)
{
    static const struct itimerval arm = {.it_value = {.tv_sec = 5}}, disarm = {{0, 0}, {0, 0}};
    for (;;) {
        setitimer(ITIMER_REAL, &arm, NULL);
        int ret = ioctl(vm->vcpu_fd, KVM_RUN, 0);
        int err = errno;
        setitimer(ITIMER_REAL, &disarm, NULL);
        if (ret < 0) {
            if (err == EINTR) die("guest hung: no sync within 5 s (last stage %d)", vm->last_stage);
            die("KVM_RUN: %s (last stage %d)", strerror(err), vm->last_stage);
        }
        struct kvm_run *r = vm->run;
        if (r->exit_reason == KVM_EXIT_IO) {
            uint8_t data = *((uint8_t *)r + r->io.data_offset);
            if (r->io.direction == KVM_EXIT_IO_OUT && r->io.port == SYNC_PORT) {
                vm->last_stage = *value = data - '0';
                return EV_SYNC;
            }
            if (r->io.direction == KVM_EXIT_IO_OUT && r->io.port == EXIT_PORT) {
                *value = data;
                return EV_DONE;
            }
            die("unexpected port I/O: port %#x (last stage %d)", r->io.port, vm->last_stage);
        }
        if (r->exit_reason == KVM_EXIT_INTR) continue;
        if (r->exit_reason == KVM_EXIT_INTERNAL_ERROR)
            die("KVM_EXIT_INTERNAL_ERROR suberror %u (last stage %d)", r->internal.suberror, vm->last_stage);
        die("KVM exit reason %u (last stage %d)", r->exit_reason, vm->last_stage);
    }
}

static void run_to(struct vm *vm, int stage)
{
    if (vm->last_stage >= 0) put32(vm->mem + MAILBOX + OFF_GO, (uint32_t)vm->last_stage);
    int value, ev = vm_run(vm, &value);
    if (ev != EV_SYNC || value != stage)
        die("expected sync %d, guest sent %s %d", stage, ev == EV_SYNC ? "sync" : "done", value);
}

static void vm_close(struct vm *vm)
{
    munmap(vm->run, run_size);
    close(vm->vcpu_fd);
    close(vm->vm_fd);
    munmap(vm->mem, MEMORY_SIZE);
}

/* XsaveImage's validation, reduced to what matters for a KVM_GET_XSAVE2 standard image. */
static void check_image(const uint8_t *img, const char *what)
{
    for (unsigned i = XSAVE_HEADER_RESERVED_LO; i < XSAVE_HEADER_RESERVED_HI; i++)
        if (img[i]) die("%s: XSAVE header byte %u is %#x, must be zero", what, i, img[i]);
    uint64_t xcomp;
    memcpy(&xcomp, img + XCOMP_BV_OFFSET, 8);
    if (xcomp) die("%s: XCOMP_BV %#llx in a standard-format image", what, (unsigned long long)xcomp);
}

static const char *locate(unsigned offset, unsigned *byte)
{
    for (int i = 0; i < T.nregs; i++) {
        if (offset < T.regs[i].width) { *byte = offset; return T.regs[i].name; }
        offset -= T.regs[i].width;
    }
    *byte = offset;
    return "?";
}

/* The `import` scenario, once. */
static void scenario(const uint8_t *code, size_t code_len, int corrupt_expect)
{
    static uint8_t baseline[1 << 16], image[1 << 16];
    struct vm vm;
    vm_create(&vm);
    vm_boot(&vm, code, code_len);
    uint8_t *mb = vm.mem + MAILBOX;

    run_to(&vm, 0);
    IOCTL(vm.vcpu_fd, KVM_GET_XSAVE2, baseline);
    check_image(baseline, "baseline KVM_GET_XSAVE2");

    memcpy(mb + LOAD_AREA, T.load, T.bank_bytes);
    run_to(&vm, 1);
    IOCTL(vm.vcpu_fd, KVM_GET_XSAVE2, image);
    check_image(image, "KVM_GET_XSAVE2 at stage 1");

    /* image.write(name, value) for every register: make each component live, then the bytes. */
    uint64_t xstate_bv;
    memcpy(&xstate_bv, image + T.xstate_bv_offset, 8);
    for (int i = 0; i < T.ncomponents; i++) {
        struct component *c = &T.components[i];
        if (xstate_bv >> c->number & 1) continue;
        uint8_t keep[64];
        unsigned keep_len = c->keep_hi > c->keep_lo ? c->keep_hi - c->keep_lo : 0;
        if (keep_len > sizeof keep) die("component %d: keep range too large", c->number);
        memcpy(keep, image + c->offset + c->keep_lo, keep_len);
        memset(image + c->offset, 0, c->size);
        memcpy(image + c->offset, c->init, c->init_len);
        memcpy(image + c->offset + c->keep_lo, keep, keep_len);
        xstate_bv |= 1ull << c->number;
    }
    memcpy(image + T.xstate_bv_offset, &xstate_bv, 8);
    const uint8_t *value = T.import;
    for (int i = 0; i < T.nregs; i++)
        for (int j = 0; j < T.regs[i].npieces; j++) {
            memcpy(image + T.regs[i].pieces[j].offset, value, T.regs[i].pieces[j].size);
            value += T.regs[i].pieces[j].size;
        }
    IOCTL(vm.vcpu_fd, KVM_SET_XSAVE, image);

    /* guest_verify */
    memcpy(mb + EXPECT_AREA, T.import, T.bank_bytes);
    if (corrupt_expect) mb[EXPECT_AREA] ^= 0x5A;
    run_to(&vm, 2);
    uint32_t status = get32(mb + OFF_STATUS), mismatch = get32(mb + OFF_MISMATCH);
    if (status != STATUS_OK) {
        unsigned byte;
        const char *reg = locate(mismatch, &byte);
        die("guest verify failed: status %u, mismatch at %s %s byte %u (offset %u)", status, T.bank, reg,
            byte, mismatch);
    }
    if (mismatch != NO_MISMATCH) die("guest reported ok but mismatch_offset is %#x", mismatch);
    if (memcmp(mb + STORE_AREA, mb + EXPECT_AREA, T.bank_bytes)) {
        unsigned k = 0, byte;
        while (mb[STORE_AREA + k] == mb[EXPECT_AREA + k]) k++;
        const char *reg = locate(k, &byte);
        die("guest reported ok but stored %s %s byte %u differs", T.bank, reg, byte);
    }
    put32(mb + OFF_GO, 2);
    int final, ev = vm_run(&vm, &final);
    if (ev != EV_DONE) die("expected the guest to finish, it sent sync %d", final);
    if (final != STATUS_OK) die("guest finished with status %d after verifying ok", final);
    vm_close(&vm);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(void)
{
    fprintf(stderr, "usage: kvm_scenario --payload FILE --table FILE [--iterations N] [--warmup N] "
                    "[--corrupt-expect]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *payload = NULL, *table = NULL;
    long iterations = 200, warmup = 3;
    int corrupt = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--payload") && i + 1 < argc) payload = argv[++i];
        else if (!strcmp(argv[i], "--table") && i + 1 < argc) table = argv[++i];
        else if (!strcmp(argv[i], "--iterations") && i + 1 < argc) iterations = strtol(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = strtol(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--corrupt-expect")) corrupt = 1;
        else usage();
    }
    if (!payload || !table || iterations < 1 || warmup < 0) usage();

    read_table(table);
    size_t code_len;
    const uint8_t *code = read_file(payload, &code_len);
    host_setup();
    struct sigaction sa = {.sa_handler = on_alarm}; /* no SA_RESTART: KVM_RUN returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);

    double *ms = calloc((size_t)iterations, sizeof *ms);
    if (!ms) die("out of memory");
    for (long i = -warmup; i < iterations; i++) {
        in_loop = 1;
        iteration = i;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        scenario(code, code_len, corrupt);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (i >= 0) ms[i] = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    }

    printf("{\"bank\": \"%s\", \"scenario\": \"import\", \"iterations\": %ld, \"warmup\": %ld, \"times_ms\": [",
           T.bank, iterations, warmup);
    double sum = 0;
    for (long i = 0; i < iterations; i++) {
        printf("%s%.6f", i ? ", " : "", ms[i]);
        sum += ms[i];
    }
    qsort(ms, (size_t)iterations, sizeof *ms, cmp_double);
    double median = iterations % 2 ? ms[iterations / 2] : (ms[iterations / 2 - 1] + ms[iterations / 2]) / 2;
    printf("], \"min_ms\": %.6f, \"median_ms\": %.6f, \"mean_ms\": %.6f}\n", ms[0], median, sum / iterations);
    return 0;
}
