"""Scenario cases by id (`kvm-ymm-import`, `qemu-tcg-x87-fresh_vm`; `qemu11-kvm-ymm-export`
when several QEMUs run side by side): which exist, and running one without pytest.

The one place that knows the backends (their factories and Session features), which
scenarios apply to which bank and backend, and how a case's outcome is decided.  The
pytest plugin, the remote agent and the avocado tests all go through it:
  - the backend cannot run the bank here -> "skip", reason `<id>: <why>`; for the apx bank
    the skip is one that lab mode (--apx-require) turns into a failure (`require_applies`);
  - the payload cannot be built -> "fail" `<id>: <GuestBuildError>`;
  - ScenarioFailure -> "fail", one line per finding, the first prefixed with `<id>: `;
  - BackendError -> "fail" `<id>: <error>`;
  - anything else -> "fail" `<id>: <Type>: <message>` with the traceback kept aside.
The messages are those of a local run, so a remote outcome reads exactly like a local one.

Only the standard library and apx_tests: the agent runs on hosts without pytest.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import profiles
from .backend import Backend, BackendError
from .guests.build import GuestBuildError, build_payload
from .kvm.backend import KvmSession
from .probe import BANK_ORDER
from .profiles import DEFAULT_PROFILE
from .qemu.host import FEATURES as QEMU_FEATURES
from .qemu.binaries import backend_label, parse_backend
from .scenarios import SCENARIOS, Run, ScenarioFailure, ScenarioNotApplicable
from .xsave import BANKS

OUTCOMES = ("pass", "fail", "skip")

# Backend name -> the Session features it offers (what Scenario.requires is checked against).
BACKEND_FEATURES: dict[str, frozenset[str]] = {
    "kvm": KvmSession.features,
    "qemu-kvm": QEMU_FEATURES["kvm"],
    "qemu-tcg": QEMU_FEATURES["tcg"],
}
BACKENDS = tuple(BACKEND_FEATURES)
# The Linux-guest cases (apx_tests/suite/test_linux.py: a kernel and a user-space holder
# under QEMU TCG) are not Session scenarios, but --apx-backend selects them like one.
LINUX_BACKEND = "qemu-tcg-linux"
SELECTABLE_BACKENDS = BACKENDS + (LINUX_BACKEND,)
# A --apx-backend choice may stand for several backends.
BACKEND_GROUPS = {"qemu": ("qemu-kvm", "qemu-tcg", LINUX_BACKEND), "linux": (LINUX_BACKEND,),
                  "all": SELECTABLE_BACKENDS}
BACKEND_CHOICES = (*SELECTABLE_BACKENDS, *BACKEND_GROUPS)


def expand_backends(choices) -> tuple[str, ...]:
    """--apx-backend choices ("kvm", "qemu", "all", "qemu-tcg", "linux") -> backend names, in order."""
    chosen = {b for choice in choices for b in BACKEND_GROUPS.get(choice, (choice,))}
    return tuple(b for b in SELECTABLE_BACKENDS if b in chosen)


def open_backend(name: str, *, qemu: str | None = None, artifacts: str | None = None,
                 profile: str = DEFAULT_PROFILE, tag: str = "", keep_warm: bool = False) -> Backend:
    """Open backend `name` (kvm, qemu-kvm, qemu-tcg) with CPU profile `profile`
    (apx_tests.profiles), a QEMU backend on binary `qemu` whose case ids carry `tag`;
    `keep_warm`: a QEMU backend starts each next boot's QEMU ahead (QemuHost.spare_boots).
    OSError (KvmUnavailable, QemuUnavailable) when it cannot be."""
    cpu = profiles.profile(profile)
    if name == "kvm":
        from .kvm.backend import KvmBackend, KvmHost
        return KvmBackend(KvmHost(profile=cpu))
    from .qemu.backend import QemuBackend
    backend = QemuBackend(name.split("-", 1)[1], qemu=qemu, profile=cpu, tag=tag)
    backend.host.spare_boots = keep_warm
    if artifacts:
        backend.host.artifacts = os.path.join(artifacts, backend.name)
    return backend


def close_backend(backend) -> None:
    host = getattr(backend, "host", None)
    if host is not None:
        host.close()


class CaseIdError(ValueError):
    """Not a case id this tree knows; str() is one line."""


@dataclass(frozen=True)
class CaseId:
    backend: str       # kvm, qemu-kvm, qemu-tcg: what features, faults and --apx-backend go by
    bank: str
    scenario: str
    qemu: str = ""     # the QEMU's tag when several run side by side ("11": qemu11-kvm-...)

    @property
    def label(self) -> str:
        """The backend as the id spells it: `qemu11-kvm` for a tagged QEMU case."""
        return backend_label(self.backend, self.qemu)

    @property
    def id(self) -> str:
        return f"{self.label}-{self.bank}-{self.scenario}"

    @classmethod
    def parse(cls, text: str) -> "CaseId":
        parts = text.rsplit("-", 2)  # backend names have dashes (qemu-tcg); banks do not
        if len(parts) != 3:
            raise CaseIdError(f"{text!r} is not a case id (BACKEND-BANK-SCENARIO, e.g. kvm-ymm-import)")
        backend, bank, scenario = parts
        tag = ""
        qemu = parse_backend(backend)
        if qemu is not None:
            tag, backend = qemu
        if backend not in BACKENDS:
            raise CaseIdError(f"{text}: unknown backend {backend!r} (known: {', '.join(BACKENDS)}; "
                              f"QEMU ones may carry a version, e.g. qemu11-kvm)")
        if bank not in BANK_ORDER:
            raise CaseIdError(f"{text}: unknown bank {bank!r} (known: {', '.join(BANK_ORDER)})")
        if scenario not in SCENARIOS:
            raise CaseIdError(f"{text}: unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
        # Whether the scenario applies to this bank and backend was decided where the case
        # was chosen (cases() below): a runner runs what it is asked, so a remote end never
        # second-guesses the local tree's catalogue.
        return cls(backend, bank, scenario, tag)


def cases(backends=BACKENDS, qemus=("",)) -> list[CaseId]:
    """Every case of `backends`: banks, then scenarios, where the scenario applies.  A QEMU
    backend has its cases once per tag in `qemus` (one per QEMU of the run: "" when only
    one runs, else "10", "11", ...), the QEMUs in their order."""
    return [CaseId(backend, bank, name, tag) for backend in backends if backend in BACKEND_FEATURES
            for tag in (qemus if backend.startswith("qemu-") else ("",))
            for bank in BANK_ORDER
            for name, scenario in SCENARIOS.items()
            if scenario.requires <= BACKEND_FEATURES[backend] and scenario.applies_to(bank)]


def case_ids(backend: str = "kvm") -> list[str]:
    return [case.id for case in cases((backend,))]


@dataclass
class CaseResult:
    id: str
    outcome: str                      # pass | fail | skip
    lines: list[str] = field(default_factory=list)
    duration: float = 0.0
    require_applies: bool = False     # a skip that --apx-require turns into a failure
    traceback: str | None = None      # only for an unexpected exception
    facts: dict = field(default_factory=dict)

    @property
    def message(self) -> str:
        return "\n".join(self.lines)

    def to_json(self) -> dict:
        return {"kind": "case", **asdict(self)}

    @classmethod
    def from_json(cls, record: dict) -> "CaseResult":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in names})


class CaseRunner:
    """Opens each backend once (lazily), runs cases one by one, closes everything.

    `qemu`: the QEMUs of the run -- None for the default ones (apx_tests.qemu.binaries:
    PATH's QEMU and ci/bootstrap's side QEMUs), a path, or a list of paths / QemuBinary.
    A case id's QEMU tag picks one (`qemu11-kvm-...`); an untagged `qemu-kvm-...` runs on
    the first."""

    def __init__(self, payload: Callable[[str], bytes] | None = None, *, qemu=None,
                 artifacts: str | None = None, session_wrapper: Callable | None = None,
                 profile: str = DEFAULT_PROFILE, keep_warm: bool = False):
        self.payload = payload or (lambda bank: build_payload(bank).code)
        self.session_wrapper = session_wrapper  # fault injection (apx_tests.faults), passed to Run
        # Reporting (apx_tests.pytest.reporting): called with each Run before its scenario starts.
        self.prepare_run: Callable[[CaseId, Run], None] | None = None
        # keep_warm: for a caller that runs a backend's cases back to back and says when it
        # moves on (idle()): the pytest plugin.
        self.options = {"artifacts": artifacts, "profile": profile, "keep_warm": keep_warm}
        self._qemu_spec = qemu
        self._qemus = None
        self._backends: dict[str, object] = {}
        self._errors: dict[str, str] = {}

    @property
    def qemus(self):
        """The run's QEMUs (QemuBinary, with tags), resolved when first needed."""
        if self._qemus is None:
            from .qemu.binaries import resolve_qemus
            self._qemus = resolve_qemus(self._qemu_spec)
        return self._qemus

    def backend(self, name: str, tag: str = ""):
        """(backend, None) or (None, reason): backend `name` (kvm, qemu-kvm, qemu-tcg) on
        the QEMU of `tag`."""
        label = backend_label(name, tag)
        if label not in self._backends and label not in self._errors:
            try:
                options = dict(self.options)
                if name.startswith("qemu-"):
                    binary = self._qemu_for(tag)
                    options.update(qemu=binary.path, tag=binary.tag)
                self._backends[label] = open_backend(name, **options)
            except OSError as exc:
                self._errors[label] = f"{label} backend unavailable: {exc.strerror or exc}"
            except ValueError as exc:  # QemuListError: the QEMUs cannot be told apart
                self._errors[label] = f"{label} backend unavailable: {exc}"
        return self._backends.get(label), self._errors.get(label)

    def _qemu_for(self, tag: str):
        from .qemu.binaries import pick
        from .qemu.errors import QemuUnavailable
        binary = pick(self.qemus, tag)
        if binary is None:
            have = ", ".join(f"{b.version or '?'} ({b.path})" for b in self.qemus)
            raise QemuUnavailable(f"no QEMU {tag} among this run's QEMUs ({have}); add it with --apx-qemu PATH")
        if binary.error and not binary.version:
            raise QemuUnavailable(binary.error)
        return binary

    def facts(self, case: CaseId, unavailable: str | None) -> dict:
        backend, _ = self.backend(case.backend, case.qemu)
        host = getattr(backend, "host", None)
        facts = {"backend": case.label, "bank": case.bank, "unavailable": unavailable,
                 "cpu_profile": self.options["profile"]}
        if case.backend == "kvm" and host is not None:
            facts["kvm_supported_xcr0"] = f"{host.supported_xcr0:#x}"
            facts["kvm_xsave2_size"] = host.xsave2_size
            facts["kvm_apx_cpuid"] = host.apx_cpu
        elif host is not None and hasattr(host, "version_text"):
            facts["qemu"] = host.qemu
            facts["qemu_version"] = host.version_text
        return facts

    def unavailable(self, case: CaseId) -> str | None:
        backend, error = self.backend(case.backend, case.qemu)
        return error or backend.unavailable_reason(BANKS[case.bank])

    def run(self, case_id: str) -> CaseResult:
        start = time.monotonic()
        result = self._run(case_id)
        result.duration = round(time.monotonic() - start, 6)
        return result

    def _run(self, case_id: str) -> CaseResult:
        try:
            case = CaseId.parse(case_id)
        except CaseIdError as exc:
            return CaseResult(case_id, "fail", [str(exc)])
        try:
            unavailable = self.unavailable(case)
            facts = self.facts(case, unavailable)
            if unavailable:
                backend, _ = self.backend(case.backend, case.qemu)
                # Lab mode fails an APX case that cannot run, and any case whose CPU
                # profile this host cannot provide (the lab asked for that kind of host).
                asked_for = backend is not None and backend.profile_unavailable() is not None
                return CaseResult(case_id, "skip", [f"{case_id}: {unavailable}"],
                                  require_applies=case.bank == "apx" or asked_for, facts=facts)
            try:
                payload = self.payload(case.bank)
            except GuestBuildError as exc:
                return CaseResult(case_id, "fail", [f"{case_id}: {exc}"], facts=facts)
            backend, _ = self.backend(case.backend, case.qemu)
            try:
                with Run(backend, BANKS[case.bank], payload, session_wrapper=self.session_wrapper) as run:
                    if self.prepare_run is not None:
                        self.prepare_run(case, run)
                    SCENARIOS[case.scenario].run(run)
            except ScenarioNotApplicable as why:
                return CaseResult(case_id, "skip", [f"{case_id}: {why}"],
                                  require_applies=case.bank == "apx", facts=facts)
            except ScenarioFailure as failure:
                lines = list(failure.lines) or [""]
                return CaseResult(case_id, "fail", [f"{case_id}: {lines[0]}", *lines[1:]], facts=facts)
            except BackendError as exc:
                return CaseResult(case_id, "fail", [f"{case_id}: {exc}"], facts=facts)
            return CaseResult(case_id, "pass", [], facts=facts)
        except Exception as exc:  # a bug, reported as one line with the traceback aside
            return CaseResult(case_id, "fail", [f"{case_id}: {type(exc).__name__}: {exc}"],
                              traceback=traceback.format_exc())

    def idle(self, label: str) -> None:
        """The cases of backend `label` (`qemu11-kvm`) are over for now: let go of what it
        keeps warm for its next case (Backend.idle)."""
        backend = self._backends.get(label)
        if backend is not None:
            backend.idle()

    def close(self) -> None:
        for backend in self._backends.values():
            close_backend(backend)
        self._backends.clear()

    def __enter__(self) -> "CaseRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
