"""Every real public manifest (tests/golden/real/cases, plus the `"$@"` variants in derived/)
through the real `kvmesh inject`, whatever it decides, checked against the real consumers:

- denied: nothing written, the denial on stderr;
- skipped: the pod exactly as it was, but for the `kvmesh.dev/status` annotation that says why;
- injected: the env the kubelet expands ($(VAR) references) loads in LMCache's own config loader
  of the chosen generation (redis: 0.3.6, controller: 0.5.6) with P2P on at the pod's own
  address, one port set per rank and a CPU cache that fits the memory limit; the argv vLLM gets
  (for `sh -c`/`bash -c` launches: what a real shell passes, "$@" and variables expanded)
  parses with vLLM 0.33.0's own parser, with LMCache's connector in --kv-transfer-config and as
  many ranks as kvmesh configured; and a connector the user had set is not replaced;
- every case: injecting the output again changes nothing.

The tests assert consistency, not particular decisions, so they hold whatever the core decides;
the golden tier pins the decisions themselves.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest

import consumers
import real_cases as rc
from injected import POD_IP
from kvmesh.core import contract, names

pytestmark = pytest.mark.consumers

DERIVED = sorted((Path(__file__).parent / "derived").glob("*.yaml"))
FILES = rc.case_files() + DERIVED
IDS = [f.stem for f in FILES]
LMCACHE_CONNECTORS = set(contract.LMCACHE_CONNECTORS)
MP_CONNECTOR = "LMCacheMPConnector"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, rc.Outcome]:
    return rc.run_all(FILES, tmp_path_factory.mktemp("cli"))


def _injected(outcomes) -> list[rc.Workload]:
    return [w for o in outcomes.values() for w in o.workloads if w.injected]


def _without_status(doc: dict, w: rc.Workload) -> dict:
    doc = json.loads(json.dumps(doc))
    meta = w.template(doc).setdefault("metadata", {})
    ann = meta.get("annotations") or {}
    ann.pop(names.ANN_STATUS, None)
    if ann:
        meta["annotations"] = ann
    else:
        meta.pop("annotations", None)
    labels = meta.get("labels") or {}
    labels.pop(names.LABEL_SKIPPED, None)
    if labels:
        meta["labels"] = labels
    else:
        meta.pop("labels", None)
    return doc


@pytest.mark.parametrize("case", IDS)
def test_decision_is_whole(case, outcomes):
    """Denied: nothing written; skipped or passed through: only the status annotation (and,
    when skipped, the kvmesh.dev/skipped label naming the same reason) added."""
    o = outcomes[case]
    assert "Traceback" not in o.stderr, o.stderr
    assert o.rc in (0, 1), o.stderr
    if o.rc == 1:
        assert o.stdout == ""
        assert "kvmesh: denied:" in o.stderr, o.stderr
        return
    assert len(o.outputs) == len(o.inputs)
    for i, out in zip(o.inputs, o.outputs):
        if not (isinstance(i, dict) and i.get("kind") in rc.workloads.TEMPLATE_PATHS):
            assert out == i  # other kinds pass through untouched
    for w in o.workloads:
        st = w.status
        if w.injected:
            continue
        assert _without_status(w.doc_out, w) == _without_status(w.doc_in, w), \
            f"{w.label}: skipped (status {st}) but the pod was changed"
        if st is not None:
            assert st["injected"] is False
            assert isinstance(st.get("reason"), str) and st["reason"], st
            assert isinstance(st.get("message"), str) and st["message"], st
            labels = w.template(w.doc_out)["metadata"].get("labels") or {}
            assert names.LABEL_PEER_GROUP not in labels
            assert labels.get(names.LABEL_SKIPPED) == st["reason"], labels


@pytest.mark.parametrize("case", IDS)
def test_inject_twice_is_inject_once(case, outcomes):
    o = outcomes[case]
    if o.rc != 0:
        pytest.skip(f"{case} is denied: nothing to inject again")
    assert o.again == o.stdout


def test_real_cases_reach_the_consumers(outcomes):
    """The consumer checks below are not vacuous: some real cases are injected."""
    derived = {f.stem for f in DERIVED}
    injected = [w.label for w in _injected(outcomes) if w.case not in derived]
    assert injected, "no real case is injected: the consumer contract checks nothing"


# --- what the consumers are given ------------------------------------------------------------

class Given:
    """For one injected workload: the running pod, the target container, the env the kubelet
    expands, the argv vLLM gets before and after injection."""

    def __init__(self, w: rc.Workload, tmp: Path):
        self.w = w
        self.status = w.status
        self.mode = self.status["mode"]
        self.pod = rc.running_pod(w)
        self.c = rc.container(self.pod, self.status["container"])
        self.env = consumers.kubelet_expand(self.c.get("env") or [], self.pod)
        self.ports = rc.kvmesh_ports(self.c)
        before = rc.workloads.pod_for(w.doc_in)
        before.setdefault("metadata", {}).setdefault("name", rc.POD_NAME)
        c0 = rc.container(before, self.status["container"])
        self.env_in = {e["name"]: e.get("value") for e in c0.get("env") or []}
        env0 = consumers.kubelet_expand(c0.get("env") or [], before)
        self.argv_error = None  # a launch no real shell turns into a vLLM server: why
        try:
            self.form, self.argv = rc.vllm_argv(self.c, self.env, tmp / "after")
            self.argv_before = rc.vllm_argv(c0, env0, tmp / "before")[1]
        except AssertionError as e:
            self.argv_error = str(e)

    @property
    def written(self) -> list[str]:
        """The env variables kvmesh added or changed."""
        return [e["name"] for e in self.c.get("env") or []
                if self.env_in.get(e["name"], object()) != e.get("value")]

    @property
    def ranks(self) -> int:
        init = names.PORT_NAME_INIT.format(rank="")
        return len([p for p in self.ports if p.startswith(init)])


@pytest.fixture(scope="module")
def given(outcomes, tmp_path_factory) -> dict[str, Given]:
    out = {}
    for i, w in enumerate(_injected(outcomes)):
        out[w.label] = Given(w, tmp_path_factory.mktemp(f"given{i}"))
    return out


@pytest.fixture(scope="module")
def lmcache(given) -> dict[str, dict]:
    """LMCache's loader result per injected workload, one probe per generation."""
    res = {}
    for mode in (names.MODE_REDIS, names.MODE_CONTROLLER):  # = consumers.GENERATIONS' keys
        batch = [g for g in given.values() if g.mode == mode]
        if batch:
            got = rc.consumer(consumers.lmcache_parse, mode, [g.env for g in batch])
            res.update({g.w.label: r for g, r in zip(batch, got)})
    mp = [g for g in given.values() if g.mode == names.MODE_MP]
    if mp:
        res.update({g.w.label: r for g, r in zip(mp, _mp_servers(mp))})
    return res


def _mp_servers(batch: list[Given]) -> list[dict]:
    """mp mode: LMCache runs as the `lmcache server` sidecar; its own CLI checks its argv."""
    cases = []
    for g in batch:
        side = rc.container(g.pod, names.MP_SIDECAR)
        env = consumers.kubelet_expand(side.get("env") or [], g.pod)
        argv = rc.expand_words(list(side.get("command") or []) + list(side.get("args") or []),
                               env)
        cases.append({"cmd": "server", "argv": argv[argv.index("server") + 1:], "env": env})
    return rc.consumer(consumers.run_probe, f"vllm-{consumers.VLLM_VERSION}", "probe_mp.py",
                       {"cases": cases})["results"]


def inserted(before: list[str], after: list[str]) -> list[str]:
    """The words kvmesh added to the argv (after = before with words inserted)."""
    sm = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    return [w for op, _, _, j1, j2 in sm.get_opcodes() if op != "equal" for w in after[j1:j2]]


@pytest.fixture(scope="module")
def vllm(given) -> dict[str, tuple[dict, dict, dict]]:
    """vLLM's parser on the argv after and before injection, and on kvmesh's words alone (for
    an input whose own flags are older than vLLM 0.33.0); one probe for all."""
    gs = [g for g in given.values() if g.argv_error is None]
    cases = [{"argv": a} for g in gs for a in (
        g.argv, g.argv_before, ["vllm", "serve", "m", *inserted(g.argv_before, g.argv)])]
    got = rc.consumer(consumers.vllm_parse, cases) if cases else []
    return {g.w.label: tuple(got[3 * i:3 * i + 3]) for i, g in enumerate(gs)}


def _for(case, given):
    gs = [g for g in given.values() if g.w.case == case]
    if not gs:
        pytest.skip(f"{case}: not injected (test_decision_is_whole checks it)")
    return gs


@pytest.mark.parametrize("case", IDS)
def test_kubelet_expands_every_reference_kvmesh_wrote(case, given):
    for g in _for(case, given):
        for e in g.c.get("env") or []:
            if e["name"] in g.written and "value" in e:
                assert "$(" not in g.env[e["name"]], \
                    f"{g.w.label}: {e['name']}={e['value']!r} does not expand: {g.env[e['name']]!r}"


@pytest.mark.parametrize("case", IDS)
def test_lmcache_loads_the_injected_config(case, given, lmcache):
    for g in _for(case, given):
        r = lmcache.get(g.w.label)
        assert r is not None, f"{g.w.label}: no LMCache check for mode {g.mode!r} here"
        assert r["ok"], f"{g.w.label} ({g.mode} mode): LMCache refused it: {r}"
        if g.mode == names.MODE_MP:
            continue  # the server's own argparse and validation accepted it
        cfg = r["config"]
        # LMCache logs a value it cannot read and drops it: none of kvmesh's may be dropped.
        noisy = [x for x in r.get("warnings", []) if "configuration file" not in x
                 and any(k in x or k.lower().removeprefix("lmcache_") in x for k in g.written)]
        assert not noisy, f"{g.w.label}: LMCache dropped what kvmesh wrote: {noisy}"
        assert cfg["enable_p2p"] is True and cfg["local_cpu"] is True
        size = float(g.env["LMCACHE_MAX_LOCAL_CPU_SIZE"])
        assert cfg["max_local_cpu_size"] == size > 0
        limit = ((g.c.get("resources") or {}).get("limits") or {}).get("memory")
        if limit is not None:
            assert size < contract.quantity_to_gb(str(limit)), \
                f"{g.w.label}: a {size} GB LMCache CPU cache in a {limit} container"
        if g.mode == names.MODE_REDIS:
            assert cfg["distributed_url"] == f"{POD_IP}:{g.ports[names.PORT_NAME_DISTRIBUTED]}"
            assert cfg["enable_controller"] is False
        else:
            assert cfg["enable_controller"] is True and cfg["p2p_host"] == POD_IP
            assert g.ranks >= 1
            for key, port in (("p2p_init_ports", names.PORT_NAME_INIT),
                              ("p2p_lookup_ports", names.PORT_NAME_LOOKUP),
                              ("lmcache_worker_ports", names.PORT_NAME_WORKER)):
                assert cfg[key] == [g.ports[port.format(rank=r)] for r in range(g.ranks)], key


@pytest.mark.parametrize("case", IDS)
def test_vllm_parses_what_the_shell_passes(case, given, vllm):
    for g in _for(case, given):
        assert g.argv_error is None, f"{g.w.label}: {g.argv_error}"
        after, before, alone = vllm[g.w.label]
        mine = before.get("kv_transfer_config") if before["ok"] else None
        if mine is not None:  # what the user configured is not silently replaced
            assert mine.get("kv_connector") in LMCACHE_CONNECTORS | {MP_CONNECTOR}, \
                f"{g.w.label}: kvmesh replaced the user's {mine.get('kv_connector')!r}"
            assert mine.get("kv_role") == "kv_both", \
                f"{g.w.label}: kvmesh injected into a {mine.get('kv_role')} pod"
        if before["ok"]:
            assert after["ok"], f"{g.w.label} ({g.form}): vLLM refused argv {g.argv}: {after}"
            parsed = after
        else:
            # The input's own flags belong to an older vLLM than the parser's (0.33.0): kvmesh
            # must add no error of its own, and its words must parse on their own.
            assert not after["ok"] and after["error"] == before["error"], \
                f"{g.w.label}: the input fails vLLM 0.33 with {before['error']!r}, " \
                f"the injected argv with {after.get('error')!r}"
            assert alone["ok"], f"{g.w.label}: kvmesh's own words do not parse: {alone}"
            parsed = alone
        kv = parsed["kv_transfer_config"] or {}
        if g.mode == names.MODE_MP:
            assert kv.get("kv_connector") == MP_CONNECTOR, kv
        else:
            assert kv.get("kv_connector") in LMCACHE_CONNECTORS, \
                f"{g.w.label}: vLLM runs {kv.get('kv_connector')!r}, not LMCache: {g.argv}"
            if kv["kv_connector"] == contract.CONNECTOR_V1:
                assert parsed["connector_registered"] is True
        assert kv.get("kv_role") == "kv_both", kv
        if g.mode == names.MODE_CONTROLLER and before["ok"]:
            ranks = after["tensor_parallel_size"] * after["pipeline_parallel_size"]
            assert ranks == g.ranks, \
                f"{g.w.label}: vLLM runs {ranks} ranks, kvmesh configured {g.ranks}: {g.argv}"


def test_real_shell_reconstruction_sees_dollar_at(tmp_path):
    """The reconstruction itself: "$@" from args, ${VAR} from env, $(VAR) by the kubelet."""
    c = {"command": ["/bin/bash", "-c", 'X=1; exec vllm serve "${M}" --port $(P) "$@"', "--"],
         "args": ["--tensor-parallel-size=2", "a b"]}
    form, argv = rc.vllm_argv(c, {"M": "/m", "P": "8001"}, tmp_path)
    assert form == "shell"
    assert argv == ["vllm", "serve", "/m", "--port", "8001", "--tensor-parallel-size=2", "a b"]

