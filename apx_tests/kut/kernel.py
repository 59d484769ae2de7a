"""What ``--apx-kernel KERNEL`` names, as a bootable image and the modules its guest loads.

KERNEL is one of:

  debian          Debian's generic amd64 kernel (``linux-image-amd64``'s dependency, e.g.
                  linux-image-6.1.0-57-amd64): fetched with ``apt-get download`` and
                  unpacked into $XDG_CACHE_HOME/apx_tests/kernel-under-test/<package>/.
                  The generic flavour, not the cloud one: the guest mounts the host's
                  root over 9p, which the cloud kernel lacks (CONFIG_9P_FS unset).
  FILE.deb        a linux-image .deb (e.g. from ``make bindeb-pkg``), unpacked the same way.
  DIRECTORY       a tree with boot/vmlinuz-<release> and lib/modules/<release>/: what
                  ``make install INSTALL_PATH=DIR/boot modules_install INSTALL_MOD_PATH=DIR``
                  writes, or an unpacked .deb.
  FILE            a bzImage (arch/x86/boot/bzImage) or a PVH ELF vmlinux; its modules
                  from ``--apx-kernel-modules DIR`` (DIR/lib/modules/<release>, the
                  INSTALL_MOD_PATH of ``make modules_install``), or none when everything
                  needed is built in.

Only the modules the guest needs are unpacked from a .deb: the 9p transport (virtio_mmio,
9pnet_virtio, 9p) and kvm with kvm_amd or kvm_intel, plus what they depend on, read from
each module's own modinfo (``depends=``), so no depmod or modprobe is needed anywhere.
A module listed in modules.builtin is built in and not loaded.

Errors are ``KernelError`` with one line naming the kernel and what is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..guests.elf import ElfError, read_sections
from ..guests.linux_kernel import DebData, check_kernel_image, kernel_release, KernelUnavailable
from ..guests.linux_programs import _cache_base

DEBIAN = "debian"
DEBIAN_META_PACKAGE = "linux-image-amd64"  # the generic flavour: 9p as modules
TOOL_TIMEOUT = 600

# The guest's root is the host's, over virtio-9p on microvm's virtio-mmio bus.
TRANSPORT_MODULES = ("virtio_mmio", "9pnet_virtio", "9p")
# The vendor module by the vCPU's vendor: TCG's `-cpu max` is an AMD CPU with SVM.
VENDOR_MODULES = {"AuthenticAMD": "kvm_amd", "GenuineIntel": "kvm_intel"}
# What a .deb unpack keeps on the first pass (their dependencies in Debian's kernels);
# anything else a kept module depends on is fetched by a second pass.
LIKELY_NEEDED = frozenset({"virtio_mmio", "virtio", "virtio_ring", "9pnet_virtio", "9pnet", "9p", "netfs",
                           "fscache", "kvm", "kvm_amd", "kvm_intel", "irqbypass", "ccp"})
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class KernelError(RuntimeError):
    """The kernel under test cannot be had or lacks something; str() is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def module_name(filename: str) -> str:
    """kvm-amd.ko.xz -> kvm_amd (module names use underscores, files either)."""
    base = os.path.basename(filename)
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def decompress_module(path: Path) -> bytes:
    """A module file's ELF bytes (modules_install may compress them; finit_module of
    Debian 12's kernel takes plain ELF only)."""
    data = path.read_bytes()
    name = path.name
    try:
        if name.endswith(".xz"):
            return lzma.decompress(data)
        if name.endswith(".gz"):
            return gzip.decompress(data)
        if name.endswith(".zst"):
            zstd = shutil.which("zstd")
            if zstd is None:
                raise KernelError(f"module {path} is zstd-compressed and zstd is not installed")
            out = subprocess.run([zstd, "-d", "-c", "-q"], input=data, capture_output=True, timeout=TOOL_TIMEOUT)
            if out.returncode != 0:
                raise KernelError(f"module {path}: zstd -d failed: {out.stderr.decode(errors='replace').strip()}")
            return out.stdout
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise KernelError(f"module {path}: cannot decompress: {exc}") from None
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The module's .modinfo section as key -> values (depends=, name=, alias=, ...)."""
    try:
        sections = read_sections(elf)
    except ElfError as exc:
        raise KernelError(f"not a kernel module: {exc}") from None
    info: dict[str, list[str]] = {}
    for section in sections:
        if section.name == ".modinfo":
            for item in section.data.split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


def depends_of(elf: bytes) -> list[str]:
    values = modinfo(elf).get("depends", [])
    return [module_name(d) for v in values for d in v.split(",") if d]


@dataclass
class KernelTree:
    """A kernel image, its release and where its modules are."""

    image: Path
    release: str
    modules: Path | None            # .../lib/modules/<release>, or None (all built in)
    source: str                     # how --apx-kernel named it, for messages
    _index: dict[str, Path] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"kernel[{self.release}]"

    def builtin(self) -> set[str]:
        if self.modules is None:
            return set()
        try:
            text = (self.modules / "modules.builtin").read_text(errors="replace")
        except OSError:
            return set()
        return {module_name(line.strip()) for line in text.splitlines() if line.strip()}

    def index(self) -> dict[str, Path]:
        """module name -> file, for every module under the tree."""
        if self._index is None:
            found: dict[str, Path] = {}
            if self.modules is not None and self.modules.is_dir():
                for path in sorted(self.modules.rglob("*")):
                    if path.name.endswith(_MODULE_SUFFIXES) and path.is_file():
                        found.setdefault(module_name(path.name), path)
            self._index = found
        return self._index

    def load_plan(self, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
        """(module name, ELF bytes) in load order (dependencies first) for `wanted`;
        built-in ones are left out; a module that is neither is a KernelError."""
        builtin, index = self.builtin(), self.index()
        order: list[tuple[str, bytes]] = []
        seen: set[str] = set()

        def visit(name: str, needed_by: str | None) -> None:
            if name in seen or name in builtin:
                return
            seen.add(name)
            path = index.get(name)
            if path is None:
                why = f"needed by {needed_by}" if needed_by else _WHY.get(name, "needed")
                where = (f"no {name}.ko under {self.modules} and not in its modules.builtin"
                         if self.modules is not None else
                         f"not built in, and no modules were given (--apx-kernel-modules DIR)")
                raise KernelError(f"{self.label} ({self.source}): module {name} ({why}): {where}")
            elf = decompress_module(path)
            for dep in depends_of(elf):
                visit(dep, name)
            order.append((name, elf))

        for name in wanted:
            visit(name, None)
        return order


_WHY = {"9p": "the guest mounts the host's root over 9p: CONFIG_9P_FS",
        "9pnet_virtio": "CONFIG_NET_9P_VIRTIO", "virtio_mmio": "microvm's virtio bus: CONFIG_VIRTIO_MMIO",
        "kvm": "CONFIG_KVM", "kvm_amd": "CONFIG_KVM_AMD (the TCG vCPU is AMD with SVM)",
        "kvm_intel": "CONFIG_KVM_INTEL"}


# --- naming the kernel without fetching it (collection) --------------------------------------

def debian_package() -> str:
    """The binary package linux-image-amd64 depends on now (linux-image-6.1.0-57-amd64)."""
    try:
        out = subprocess.run(["apt-cache", "depends", DEBIAN_META_PACKAGE], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"--apx-kernel debian: cannot run apt-cache ({exc}); not a Debian system? "
                          "give a bzImage, a directory or a .deb") from None
    match = re.search(r"Depends:\s*(linux-image-\S+-amd64)\s*$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        detail = (out.stderr.strip().splitlines() or ["no linux-image dependency listed"])[-1]
        raise KernelError(f"--apx-kernel debian: cannot resolve {DEBIAN_META_PACKAGE} with apt-cache: {detail} "
                          "(run apt-get update, or ci/kernel-deps)")
    return match.group(1)


def _cached_debian_trees() -> list[Path]:
    root = cache_dir()
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("linux-image-"))
    except OSError:
        return []


def expected_release(spec: str, modules: str | None = None) -> str:
    """The release KERNEL will report (for item ids at collection: nothing is fetched).
    Falls back to a name derived from the spec when it cannot be known yet."""
    if spec == DEBIAN:
        try:
            return debian_package().removeprefix("linux-image-")
        except KernelError:
            cached = _cached_debian_trees()
            return cached[-1].name.removeprefix("linux-image-") if cached else DEBIAN
    path = Path(spec).expanduser()
    if path.is_dir():
        images = _images_in(path)
        return images[0][1] if images else path.name
    if path.suffix == ".deb" and path.is_file():
        try:
            out = subprocess.run(["dpkg-deb", "-f", str(path), "Package"], capture_output=True, text=True,
                                 timeout=60)
            if out.returncode == 0 and out.stdout.strip().startswith("linux-image-"):
                return out.stdout.strip().removeprefix("linux-image-")
        except (OSError, subprocess.SubprocessError):
            pass
        return path.stem
    if path.is_file():
        return kernel_release(path)
    return path.name or spec


# --- resolving (may download and unpack) -------------------------------------------------------

def cache_dir() -> Path:
    return _cache_base() / "kernel-under-test"


def _images_in(root: Path) -> list[tuple[Path, str]]:
    """(image, release) for boot/vmlinuz-<release> under `root`."""
    out = []
    for path in sorted((root / "boot").glob("vmlinuz-*")):
        if path.is_file():
            out.append((path, path.name.removeprefix("vmlinuz-")))
    return out


def _modules_dir(root: Path, release: str) -> Path | None:
    for base in ("lib/modules", "usr/lib/modules"):
        candidate = root / base / release
        if candidate.is_dir():
            return candidate
    return None


def tree_from_directory(root: Path, source: str) -> KernelTree:
    images = _images_in(root)
    if not images:
        raise KernelError(f"--apx-kernel {root}: no boot/vmlinuz-<release> in it (make install "
                          f"INSTALL_PATH={root}/boot, or give the bzImage and --apx-kernel-modules)")
    if len(images) > 1:
        names = ", ".join(p.name for p, _ in images)
        raise KernelError(f"--apx-kernel {root}: several kernels in boot/ ({names}); give the image itself")
    image, release = images[0]
    try:
        check_kernel_image(image)
    except KernelUnavailable as exc:
        raise KernelError(str(exc)) from None
    return KernelTree(image, release, _modules_dir(root, release), source)


def resolve(spec: str, modules: str | None = None) -> KernelTree:
    """The KernelTree for --apx-kernel `spec` (and --apx-kernel-modules `modules`)."""
    if spec == DEBIAN:
        package = debian_package()
        root = cache_dir() / package
        if not _images_in(root):
            fetch_debian(package, root)
        return tree_from_directory(root, f"--apx-kernel debian: {package}")
    path = Path(spec).expanduser().absolute()
    if path.is_dir():
        return tree_from_directory(path, f"--apx-kernel {path}")
    if not path.is_file():
        raise KernelError(f"--apx-kernel {spec}: no such file or directory (want a bzImage, a directory, "
                          "a linux-image .deb, or 'debian')")
    if path.suffix == ".deb":
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        root = cache_dir() / f"deb-{digest}"
        if not _images_in(root):
            unpack_deb(path, root)
        return tree_from_directory(root, f"--apx-kernel {path}")
    try:
        check_kernel_image(path)
    except KernelUnavailable as exc:
        raise KernelError(f"--apx-kernel {path}: {exc}") from None
    release = kernel_release(path)
    moddir = None
    if modules:
        mod_root = Path(modules).expanduser().absolute()
        moddir = _modules_dir(mod_root, release)
        if moddir is None:
            have = ", ".join(sorted(p.name for p in (mod_root / "lib" / "modules").glob("*"))) or "nothing"
            raise KernelError(f"--apx-kernel-modules {mod_root}: no lib/modules/{release} for {path.name} "
                              f"(release {release}; it has {have})")
    return KernelTree(path, release, moddir, f"--apx-kernel {path}")


def fetch_debian(package: str, root: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="apx-kut-deb-") as tmp:
        argv = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:  # root: apt's _apt sandbox user cannot write a 0700 temp dir
            argv += ["-o", "APT::Sandbox::User=root"]
        try:
            out = subprocess.run(argv + [package], cwd=tmp, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelError(f"--apx-kernel debian: apt-get download {package}: {exc}") from None
        debs = sorted(Path(tmp).glob("*.deb"))
        if out.returncode != 0 or not debs:
            lines = [l for l in (out.stderr + out.stdout).splitlines() if l.strip()]
            errors = [l for l in lines if l.startswith("E:")]
            raise KernelError(f"--apx-kernel debian: cannot download {package} with apt-get: "
                              f"{(errors or lines or ['no output'])[-1]}")
        unpack_deb(debs[0], root)


def unpack_deb(deb: Path, root: Path) -> None:
    """boot/vmlinuz-*, boot/config-*, the modules.* lists and the modules the guest needs
    (with their dependencies) from `deb` into `root`, atomically (a temp dir renamed)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        want = set(LIKELY_NEEDED)
        infos = _unpack_pass(deb, staging, want, first=True)
        for _ in range(4):  # a dependency outside LIKELY_NEEDED: fetch it by another pass
            kept = {name for name, (_, kept_) in infos.items() if kept_}
            missing = {d for name in kept for d in infos[name][0]} - kept
            missing = {m for m in missing if m in infos}
            if not missing:
                break
            want |= missing
            infos = _unpack_pass(deb, staging, want, first=False)
        if not _images_in(staging):
            raise KernelError(f"{deb.name}: no boot/vmlinuz-* in it: not a linux-image package")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack_pass(deb: Path, dest: Path, want: set[str], *, first: bool) -> dict[str, tuple[list[str], bool]]:
    """One read of the .deb's data: writes what is wanted, returns every module's
    (depends, kept)."""
    infos: dict[str, tuple[list[str], bool]] = {}
    with DebData(deb, KernelError) as data:
        for member in data.members():
            name = member.name.removeprefix("./")
            if not member.isfile() or ".." in name.split("/"):
                continue
            keep_file = name.startswith("boot/vmlinuz-") or name.startswith("boot/config-") or (
                re.fullmatch(r"(usr/)?lib/modules/[^/]+/modules\.(builtin|order|builtin\.modinfo)", name))
            if keep_file:
                if first:
                    _write(dest / name, data.read(member))
                continue
            if not name.endswith(_MODULE_SUFFIXES) or "/modules/" not in name:
                continue
            mod = module_name(name)
            if mod not in want:
                infos.setdefault(mod, ([], False))  # exists; its depends= do not matter
                continue
            _write(dest / name, data.read(member))
            infos[mod] = (depends_of(decompress_module(dest / name)), True)
    if not data.complete or data.failure:
        stderr = data.stderr.decode(errors="replace").strip()
        raise KernelError(f"cannot unpack {deb.name}: {(stderr.splitlines() or [data.failure or 'dpkg-deb failed'])[-1]}")
    return infos


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --- command line: ci/kernel-deps ------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m apx_tests.kut.kernel fetch [--no-fetch]``: make sure the Debian kernel
    under test (``--apx-kernel debian``) is in the cache; print one line, or
    ``apx_tests: error: ...`` and exit 1."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m apx_tests.kut.kernel")
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("--no-fetch", action="store_true", help="only say whether it is cached")
    args = parser.parse_args(argv)
    try:
        package = debian_package()
        root = cache_dir() / package
        if _images_in(root):
            print(f"present: {root}")
            return 0
        if args.no_fetch:
            raise KernelError(f"{package} is not in {cache_dir()}")
        fetch_debian(package, root)
        tree = tree_from_directory(root, f"--apx-kernel debian: {package}")
        print(f"fetched: {tree.image} with {len(tree.index())} modules")
        return 0
    except KernelError as exc:
        print(f"apx_tests: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
