/*
 * init.c - /init of the apx_tests Linux guest initramfs (static, no libc beyond glibc).
 *
 * Mounts devtmpfs and proc, takes /dev/console (the serial console with
 * console=ttyS0) as stdin/stdout/stderr, reads its settings from /proc/cmdline,
 * runs the register holders named by apx.run one item after the other and reports
 * each as a KTAP result line:
 *
 *     KTAP version 1
 *     1..3
 *     ok 1 holder-xmm
 *     not ok 2 holder-ymm # ymm ymm13 byte 21: want 0x8d got 0xd7 (1 differing byte, spins=9)
 *     ok 3 holder-apx # SKIP CPU lacks APX_F (CPUID.(EAX=7,ECX=1):EDX[21]=0)
 *     # apx-init: done pass=1 fail=1 skip=1
 *
 * then powers the machine off.  Kernel command line (all optional):
 *
 *   apx.run=ITEM,...     ITEM = [ctx-]BANK[@PROGRAM]; default xmm,ymm,x87,ctx-ymm.
 *                        BANK alone: one holder (/bin/apx-holder, or /bin/PROGRAM).
 *                        ctx-BANK: two holders pinned to one CPU, loading stages L
 *                        and L+1, each calling sched_yield() in its spin loop.
 *   apx.load=S           pattern stage the holders load (default 1)
 *   apx.expect=S         stage a single holder expects at the end (default: load)
 *   apx.spin_ms=N        how long each holder spins with its registers live
 *                        (default 300; 600000 with apx.release=console)
 *   apx.release=console  also end the spin when the line "apx-release" arrives
 *                        on the console (once per item)
 *   apx.cpu=N            CPU to pin holders to (ctx items default to CPU 0)
 *   apx.exit=PORT        before powering off, write 1 (all passed or skipped)
 *                        or 2 (a failure) to I/O port PORT (QEMU isa-debug-exit)
 *   apx.timeout_ms=N     grace beyond spin_ms before a holder is killed (60000)
 *   apx.wait=console     after "started", print "# apx-init: waiting for apx-run" and
 *                        read the console until the line
 *                        "apx-run ITEM,... load=S [expect=S]" arrives; it replaces
 *                        apx.run/apx.load/apx.expect ("# apx-init: command 1 ...").
 *                        The host snapshots the waiting guest once and restores it
 *                        for every case (the shared boot); an apx-run line that
 *                        arrives while a command runs is answered with
 *                        "# apx-init: busy ..." (a restore from a used state).
 *
 * See docs/linux-guests.md.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_ITEMS 32
#define RELEASE_PATH "/run/apx-release"
#define RELEASE_LINE "apx-release"
#define COMMAND_WORD "apx-run"
#define DEFAULT_RUN "xmm,ymm,x87,ctx-ymm"
#define MAX_STAGE 4 /* holder_banks.h carries stages 0..4 */

struct settings {
    char run[512];
    int load, expect; /* expect < 0: same as load */
    long spin_ms;     /* < 0: default */
    int release_console;
    int wait_console; /* apx.wait=console: the items come as a console command */
    int cpu;          /* < 0: none */
    int exit_port;    /* < 0: none */
    long timeout_ms;
};

struct child {
    pid_t pid;
    int fd;         /* read end of the result pipe, -1 at EOF */
    int load;
    int exited, status, killed;
    char buf[600];
    size_t len;
};

static volatile uint32_t *release_flag;
static int commands; /* apx-run commands taken (apx.wait=console): 0 in the waiting state */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof buf)
        n = sizeof buf - 1;
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        off += w;
    }
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void setup_console(void)
{
    mkdir("/dev", 0755);
    mkdir("/proc", 0555);
    mkdir("/run", 0755);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL); /* fails harmlessly if already there */
    mount("proc", "/proc", "proc", 0, NULL);
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd >= 0) {
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        if (fd > 2)
            close(fd);
    }
    struct termios t;
    if (tcgetattr(0, &t) == 0) { /* commands sent by the host are not echoed into the log */
        t.c_lflag &= ~(ECHO | ECHONL);
        t.c_lflag |= ICANON;
        tcsetattr(0, TCSANOW, &t);
    }
}

static void read_settings(struct settings *s)
{
    char line[4096] = "";
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, line, sizeof line - 1);
        line[n > 0 ? n : 0] = 0;
        close(fd);
    }
    strcpy(s->run, DEFAULT_RUN);
    s->load = 1, s->expect = -1, s->spin_ms = -1, s->release_console = 0, s->wait_console = 0;
    s->cpu = -1, s->exit_port = -1, s->timeout_ms = 60000;
    for (char *save = NULL, *w = strtok_r(line, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
        char *v = strchr(w, '=');
        if (strncmp(w, "apx.", 4) || !v)
            continue;
        *v++ = 0;
        if (!strcmp(w, "apx.run"))
            snprintf(s->run, sizeof s->run, "%s", v);
        else if (!strcmp(w, "apx.load"))
            s->load = atoi(v);
        else if (!strcmp(w, "apx.expect"))
            s->expect = atoi(v);
        else if (!strcmp(w, "apx.spin_ms"))
            s->spin_ms = strtol(v, NULL, 0);
        else if (!strcmp(w, "apx.release"))
            s->release_console = !strcmp(v, "console");
        else if (!strcmp(w, "apx.wait"))
            s->wait_console = !strcmp(v, "console");
        else if (!strcmp(w, "apx.cpu"))
            s->cpu = atoi(v);
        else if (!strcmp(w, "apx.exit"))
            s->exit_port = (int)strtol(v, NULL, 0);
        else if (!strcmp(w, "apx.timeout_ms"))
            s->timeout_ms = strtol(v, NULL, 0);
        else
            say("# apx-init: ignoring unknown setting %s\n", w);
    }
    if (s->spin_ms < 0)
        s->spin_ms = s->release_console ? 600000 : 300;
}

static void make_release_flag(void)
{
    int fd = open(RELEASE_PATH, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, 4096) != 0) {
        say("# apx-init: cannot create %s: %s\n", RELEASE_PATH, strerror(errno));
        return;
    }
    void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p != MAP_FAILED)
        release_flag = p;
}

/* "not ok ..." reasons become KTAP text after '#': keep them on one line, without '#'. */
static void clean(char *s)
{
    for (; *s; s++)
        if (*s == '\n' || *s == '\r')
            *s = 0;
        else if (*s == '#')
            *s = '/';
}

static int valid_name(const char *s, const char *extra)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr(extra, *s))
            return 0;
    return 1;
}

static pid_t spawn(const char *prog, char *const argv[], int *read_fd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC))
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[1], 3); /* dup2 clears O_CLOEXEC on fd 3 */
        char path[300];
        snprintf(path, sizeof path, "/bin/%s", prog);
        execv(path, argv);
        dprintf(3, "error cannot run %s: %s\n", path, strerror(errno));
        _exit(3);
    }
    close(p[1]);
    if (pid < 0) {
        close(p[0]);
        return -1;
    }
    *read_fd = p[0];
    return pid;
}

static void handle_console_input(void)
{
    static char line[128];
    static size_t len;
    char buf[128];
    ssize_t n = read(0, buf, sizeof buf);
    for (ssize_t i = 0; i < n; i++) {
        if (buf[i] == '\n' || buf[i] == '\r') {
            line[len] = 0;
            if (!strcmp(line, RELEASE_LINE) && release_flag) {
                *release_flag = 1;
                say("# apx-init: released\n");
            } else if (!strncmp(line, COMMAND_WORD " ", sizeof COMMAND_WORD)) {
                say("# apx-init: busy: command %d is running; ignoring %s\n", commands, line);
            }
            len = 0;
        } else if (len + 1 < sizeof line) {
            line[len++] = buf[i];
        }
    }
}

/* Run the holders of one item until all have exited; fill in their verdicts.
 *
 * /init sleeps in one poll() on the result pipes (and the console in release mode)
 * for the whole spin: no periodic wake-up, so while a single holder spins it is the
 * only runnable user task and the vCPU's registers are the holder's. */
static void run_children(struct child *c, int n, const struct settings *s)
{
    double limit = now_ms() + s->spin_ms + s->timeout_ms;
    for (;;) {
        struct pollfd pfd[4];
        int np = 0, idx[4];
        for (int i = 0; i < n; i++)
            if (c[i].fd >= 0) {
                pfd[np] = (struct pollfd){.fd = c[i].fd, .events = POLLIN};
                idx[np++] = i;
            }
        if (!np)
            break; /* every holder closed its pipe: it is exiting */
        int console = -1;
        if (s->release_console) {
            pfd[np] = (struct pollfd){.fd = 0, .events = POLLIN};
            console = np++;
        }
        double left = limit - now_ms();
        int r = poll(pfd, np, left <= 0 ? 0 : left > 1e9 ? -1 : (int)left + 1);
        if (r == 0 && now_ms() >= limit) {
            for (int i = 0; i < n; i++)
                if (c[i].fd >= 0) {
                    kill(c[i].pid, SIGKILL);
                    c[i].killed = 1;
                }
            limit = 1e18; /* the kill closes their pipes; keep collecting */
            continue;
        }
        for (int k = 0; r > 0 && k < np; k++) {
            if (!(pfd[k].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            if (k == console) {
                handle_console_input();
                continue;
            }
            struct child *ch = &c[idx[k]];
            ssize_t got = read(ch->fd, ch->buf + ch->len, sizeof ch->buf - 1 - ch->len);
            if (got > 0)
                ch->len += got;
            if ((got < 0 && errno != EINTR) || got == 0 || ch->len == sizeof ch->buf - 1) {
                close(ch->fd); /* EOF, or a full verdict buffer: the first line is enough */
                ch->fd = -1;
            }
        }
    }
    for (int i = 0; i < n; i++)
        if (c[i].pid > 0 && !c[i].exited) {
            while (waitpid(c[i].pid, &c[i].status, 0) < 0 && errno == EINTR)
                ;
            c[i].exited = 1;
        }
}

enum { PASS, FAIL, SKIP };

/* A child's outcome and the text for the KTAP line. */
static int outcome(struct child *c, char *why, size_t size)
{
    c->buf[c->len] = 0;
    clean(c->buf);
    const char *v = c->buf;
    if (c->killed) {
        snprintf(why, size, "no verdict after the spin and apx.timeout_ms; holder killed");
        return FAIL;
    }
    if (WIFSIGNALED(c->status)) {
        snprintf(why, size, "holder killed by signal %d (%s)", WTERMSIG(c->status), strsignal(WTERMSIG(c->status)));
        return FAIL;
    }
    int code = WIFEXITED(c->status) ? WEXITSTATUS(c->status) : -1;
    if (code == 0 && !strncmp(v, "ok", 2)) {
        snprintf(why, size, "%s", v);
        return PASS;
    }
    if (code == 2 && !strncmp(v, "skip ", 5)) {
        snprintf(why, size, "%s", v + 5);
        return SKIP;
    }
    if (code == 1 && !strncmp(v, "not ok ", 7)) {
        snprintf(why, size, "%s", v + 7);
        return FAIL;
    }
    if (!strncmp(v, "error ", 6))
        v += 6;
    if (!*v)
        v = "no verdict from the holder";
    snprintf(why, size, "%s (exit %d)", v, code);
    return FAIL;
}

static int run_item(int number, const char *item, const struct settings *s)
{
    char bank[64], prog[64] = "apx-holder", name[160];
    int ctx = !strncmp(item, "ctx-", 4);
    const char *b = ctx ? item + 4 : item, *at = strchr(b, '@');
    snprintf(bank, sizeof bank, "%.*s", at ? (int)(at - b) : (int)strlen(b), b);
    if (at)
        snprintf(prog, sizeof prog, "%s", at + 1);
    snprintf(name, sizeof name, "%s-%s", ctx ? "ctxswitch" : "holder", b);
    if (!valid_name(bank, "_") || !valid_name(prog, "_.-")) {
        say("not ok %d %s # bad apx.run item (want [ctx-]BANK[@PROGRAM])\n", number, name);
        return FAIL;
    }

    int n = ctx ? 2 : 1;
    struct child c[2] = {{0}};
    char args[2][6][24];
    if (release_flag)
        *release_flag = 0;
    for (int i = 0; i < n; i++) {
        int load = ctx ? (i == 0 ? s->load : s->load % MAX_STAGE + 1) : s->load;
        int expect = ctx || s->expect < 0 ? load : s->expect;
        int cpu = s->cpu >= 0 ? s->cpu : (ctx ? 0 : -1);
        snprintf(args[i][0], 24, "%d", load);
        snprintf(args[i][1], 24, "%d", expect);
        snprintf(args[i][2], 24, "%ld", s->spin_ms);
        snprintf(args[i][3], 24, "%d", cpu);
        char *argv[20];
        int a = 0;
        argv[a++] = prog;
        argv[a++] = bank;
        argv[a++] = "--load", argv[a++] = args[i][0];
        argv[a++] = "--expect", argv[a++] = args[i][1];
        argv[a++] = "--spin-ms", argv[a++] = args[i][2];
        argv[a++] = "--result-fd", argv[a++] = "3";
        if (cpu >= 0)
            argv[a++] = "--cpu", argv[a++] = args[i][3];
        if (ctx)
            argv[a++] = "--yield";
        if (s->release_console && release_flag)
            argv[a++] = "--release", argv[a++] = RELEASE_PATH;
        argv[a] = NULL;
        c[i].load = load;
        c[i].fd = -1;
        c[i].pid = spawn(prog, argv, &c[i].fd);
        if (c[i].pid < 0) {
            c[i].exited = 1;
            c[i].status = 3 << 8;
            snprintf(c[i].buf, sizeof c[i].buf, "error fork: %s", strerror(errno));
            c[i].len = strlen(c[i].buf);
        }
    }
    run_children(c, n, s);

    int result = PASS;
    char reason[700] = "", why[650];
    for (int i = 0; i < n; i++) {
        int r = outcome(&c[i], why, sizeof why);
        say("# %s: holder pid %d load=%d: %s%s\n", name, (int)c[i].pid, c[i].load,
            r == PASS ? "" : r == SKIP ? "skip " : "not ok ", why);
        if (r == FAIL && result != FAIL) {
            result = FAIL;
            if (ctx)
                snprintf(reason, sizeof reason, "load=%d: %s", c[i].load, why);
            else
                snprintf(reason, sizeof reason, "%s", why);
        } else if (r == SKIP && result == PASS) {
            result = SKIP;
            snprintf(reason, sizeof reason, "%s", why);
        }
    }
    if (result == PASS)
        say("ok %d %s\n", number, name);
    else if (result == SKIP)
        say("ok %d %s # SKIP %s\n", number, name, reason);
    else
        say("not ok %d %s # %s\n", number, name, reason);
    return result;
}

/* apx.wait=console: read console lines until "apx-run ITEMS load=S [expect=S]". */
static void wait_command(struct settings *s)
{
    say("# apx-init: waiting for " COMMAND_WORD "\n");
    char line[600];
    size_t len = 0;
    for (;;) {
        char ch;
        ssize_t n = read(0, &ch, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            say("# apx-init: console closed while waiting for " COMMAND_WORD "\n");
            return;
        }
        if (ch != '\n' && ch != '\r') {
            if (len + 1 < sizeof line)
                line[len++] = ch;
            continue;
        }
        line[len] = 0;
        len = 0;
        if (strncmp(line, COMMAND_WORD " ", sizeof COMMAND_WORD))
            continue;
        char *save = NULL, *w = strtok_r(line + sizeof COMMAND_WORD, " ", &save);
        if (!w)
            continue;
        snprintf(s->run, sizeof s->run, "%s", w);
        s->expect = -1;
        while ((w = strtok_r(NULL, " ", &save))) {
            if (!strncmp(w, "load=", 5))
                s->load = atoi(w + 5);
            else if (!strncmp(w, "expect=", 7))
                s->expect = atoi(w + 7);
        }
        commands++;
        say("# apx-init: command %d run=%s load=%d expect=%d\n", commands, s->run, s->load, s->expect);
        return;
    }
}

static void power_off(int status, int port)
{
    if (port >= 0 && port < 0x10000 && ioperm(port, 1, 1) == 0)
        outb(status, port); /* isa-debug-exit: QEMU exits with (status << 1) | 1 */
    sync();
    reboot(RB_POWER_OFF);
    reboot(RB_AUTOBOOT); /* with QEMU -no-reboot this ends the VM too */
    for (;;)
        pause();
}

int main(void)
{
    struct settings s;
    setup_console();
    read_settings(&s);

    char up[64] = "?";
    int fd = open("/proc/uptime", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, up, sizeof up - 1);
        up[n > 0 ? n : 0] = 0;
        close(fd);
        up[strcspn(up, " \n")] = 0;
    }
    say("# apx-init: started uptime=%s run=%s spin_ms=%ld release=%s\n", up, s.run, s.spin_ms,
        s.release_console ? "console" : "deadline");
    if (s.release_console)
        make_release_flag();
    if (s.wait_console)
        wait_command(&s);

    char *items[MAX_ITEMS];
    int n = 0;
    for (char *save = NULL, *w = strtok_r(s.run, ",", &save); w && n < MAX_ITEMS; w = strtok_r(NULL, ",", &save))
        items[n++] = w;
    say("KTAP version 1\n1..%d\n", n);
    int count[3] = {0};
    for (int i = 0; i < n; i++)
        count[run_item(i + 1, items[i], &s)]++;
    say("# apx-init: done pass=%d fail=%d skip=%d\n", count[PASS], count[FAIL], count[SKIP]);
    power_off(count[FAIL] ? 2 : 1, s.exit_port);
}
