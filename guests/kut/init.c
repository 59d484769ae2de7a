/*
 * init.c - /init of a kernel under test (apx_tests/kut, docs/kernel-under-test.md).
 *
 * The kernel boots under QEMU with this program and a few modules in its initramfs; the
 * user space is the host's own, shared read-only over 9p (mount tag "hostroot").  /init:
 *
 *   1. mounts /dev, /proc, /sys; opens the records port /dev/ttyS1 (raw);
 *   2. loads /kut/<file>.ko in the order of /kut/modules ("file<TAB>params" lines):
 *      the 9p transport stack (unless built in) and kvm + kvm_amd/kvm_intel;
 *   3. mounts the host's root read-only, a tmpfs on /run, fresh /dev /proc /sys, and
 *      chroots into it;
 *   4. checks /dev/kvm (KVM_GET_API_VERSION == 12), and powers off if it is unusable;
 *   5. runs the agent (/kut/argv, NUL separated) with stdout on the records port and
 *      stderr on the console, waits, powers off.
 *
 * On the records port it writes JSON lines of its own ("kind": "guest") between the
 * agent's: the release, each module that failed, /dev/kvm's state, the agent's exit.
 * Every message is one line; any failure still powers the machine off, so QEMU exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define RECORDS_TTY "/dev/ttyS1"
#define KVM_GET_API_VERSION 0xAE00
#define KVM_API_VERSION 12
#define MAX_ARGS 256
#define ROOT_OPTIONS "trans=virtio,version=9p2000.L,cache=loose,msize=512000"

static int records = -1;
static char release[128] = "unknown";

static double uptime(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void console(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	fprintf(stderr, "# apx-kut: %s\n", line);
	fflush(stderr);
}

/* A JSON string body: quotes, backslashes and control characters escaped. */
static void json_escape(char *out, size_t size, const char *text)
{
	size_t n = 0;
	for (; *text && n + 7 < size; text++) {
		unsigned char c = (unsigned char)*text;
		if (c == '"' || c == '\\') {
			out[n++] = '\\';
			out[n++] = c;
		} else if (c < 0x20) {
			n += snprintf(out + n, size - n, "\\u%04x", c);
		} else {
			out[n++] = c;
		}
	}
	out[n] = 0;
}

/* {"kind": "guest", "event": EVENT, "release": ..., "uptime": ..., "detail": DETAIL} */
static void record(const char *event, const char *fmt, ...)
{
	char detail[512], escaped[1100], line[1400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof detail, fmt, ap);
	va_end(ap);
	json_escape(escaped, sizeof escaped, detail);
	int len = snprintf(line, sizeof line,
			   "{\"kind\": \"guest\", \"event\": \"%s\", \"release\": \"%s\", "
			   "\"uptime\": %.3f, \"detail\": \"%s\"}\n",
			   event, release, uptime(), escaped);
	console("%s: %s", event, detail);
	if (records >= 0 && write(records, line, len) < 0)
		console("cannot write to %s: %s", RECORDS_TTY, strerror(errno));
}

static void power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

static void open_records(void)
{
	records = open(RECORDS_TTY, O_WRONLY | O_NOCTTY);
	if (records < 0) {
		console("cannot open %s: %s", RECORDS_TTY, strerror(errno));
		return;
	}
	struct termios t;
	if (tcgetattr(records, &t) == 0) { /* raw: no \n -> \r\n, no echo, 8 bits */
		cfmakeraw(&t);
		tcsetattr(records, TCSANOW, &t);
	}
}

static void load_modules(void)
{
	FILE *list = fopen("/kut/modules", "r");
	char line[1024];
	if (!list)
		return; /* nothing to load: everything built in */
	while (fgets(line, sizeof line, list)) {
		line[strcspn(line, "\n")] = 0;
		if (!*line)
			continue;
		char *params = strchr(line, '\t');
		if (params)
			*params++ = 0;
		char path[1200];
		snprintf(path, sizeof path, "/kut/%s", line);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			record("module", "%s: open: %s", line, strerror(errno));
			continue;
		}
		if (syscall(SYS_finit_module, fd, params ? params : "", 0) != 0 && errno != EEXIST)
			record("module", "%s: finit_module: %s", line, strerror(errno));
		else
			console("loaded %s", line);
		close(fd);
	}
	fclose(list);
}

static int mount_or_say(const char *source, const char *target, const char *type,
			unsigned long flags, const char *options)
{
	mkdir(target, 0755);
	if (mount(source, target, type, flags, options) == 0)
		return 0;
	record("mount", "mount %s (%s) on %s: %s", source, type, target, strerror(errno));
	return -1;
}

static int read_argv(char *buf, size_t size, char **argv)
{
	int fd = open("/kut/argv", O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t got = read(fd, buf, size - 1);
	close(fd);
	if (got <= 0)
		return -1;
	buf[got] = 0;
	int argc = 0;
	for (char *p = buf; p < buf + got && argc < MAX_ARGS - 1; p += strlen(p) + 1)
		argv[argc++] = p;
	argv[argc] = NULL;
	return argc;
}

static int check_kvm(void)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		record("kvm", "no usable /dev/kvm: open: %s", strerror(errno));
		return -1;
	}
	int version = ioctl(fd, KVM_GET_API_VERSION, 0);
	close(fd);
	if (version != KVM_API_VERSION) {
		record("kvm", "no usable /dev/kvm: KVM_GET_API_VERSION gave %d (%s), need %d", version,
		       version < 0 ? strerror(errno) : "wrong version", KVM_API_VERSION);
		return -1;
	}
	record("kvm", "ok");
	return 0;
}

int main(void)
{
	static char argbuf[16384];
	char *argv[MAX_ARGS];
	struct utsname u;

	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	if (uname(&u) == 0)
		snprintf(release, sizeof release, "%s", u.release);
	open_records();
	record("started", "init started");

	int argc = read_argv(argbuf, sizeof argbuf, argv);
	load_modules();
	if (argc <= 0) {
		record("argv", "no /kut/argv in the initramfs");
		power_off();
	}
	if (mount_or_say("hostroot", "/newroot", "9p", MS_RDONLY, ROOT_OPTIONS) != 0)
		power_off();
	/* Fresh kernel filesystems inside the new root; a tmpfs for anything written. */
	if (mount_or_say("devtmpfs", "/newroot/dev", "devtmpfs", 0, NULL) ||
	    mount_or_say("proc", "/newroot/proc", "proc", 0, NULL) ||
	    mount_or_say("sysfs", "/newroot/sys", "sysfs", 0, NULL) ||
	    mount_or_say("tmpfs", "/newroot/run", "tmpfs", 0, "mode=0755"))
		power_off();
	if (chroot("/newroot") != 0 || chdir("/") != 0) {
		record("chroot", "chroot /newroot: %s", strerror(errno));
		power_off();
	}
	if (check_kvm() != 0)
		power_off(); /* the cases need /dev/kvm: one line says why, not one per case */

	pid_t pid = fork();
	if (pid == 0) {
		char *env[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/run", "TMPDIR=/run",
			       "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1", NULL};
		if (records >= 0)
			dup2(records, 1);
		execve(argv[0], argv, env);
		record("exec", "cannot run %s: %s", argv[0], strerror(errno));
		_exit(127);
	}
	int status = 0;
	if (pid < 0)
		record("exec", "fork: %s", strerror(errno));
	else
		waitpid(pid, &status, 0);
	if (WIFSIGNALED(status))
		record("exit", "agent killed by signal %d", WTERMSIG(status));
	else
		record("exit", "agent exited with status %d", WEXITSTATUS(status));
	power_off();
	return 0;
}
