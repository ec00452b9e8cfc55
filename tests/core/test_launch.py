import pytest

from kvmesh.core import launch


@pytest.mark.parametrize("argv,at", [
    (["vllm", "serve", "m", "--x"], 2),
    (["/usr/local/bin/vllm", "serve", "m"], 2),
    (["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"], 3),
    (["python3.11", "-u", "-m", "vllm.entrypoints.openai.api_server"], 4),
    (["python", "-m", "vllm.entrypoints.cli.main", "serve", "m"], 4),
    (["tini", "--", "vllm", "serve", "m"], 4),
    (["uv", "run", "vllm", "serve"], 4),
])
def test_server_start_finds_every_exec_form(argv, at):
    assert launch.server_start(argv) == at


@pytest.mark.parametrize("argv", [
    ["vllm", "bench", "serve"], ["python3", "-m", "http.server"], ["vllm"], [], ["serve"],
    ["python", "-m", "vllm.entrypoints.cli.main", "bench"],
])
def test_server_start_rejects_non_servers(argv):
    assert launch.server_start(argv) is None


def test_flags_both_spellings_and_dotted_kv_config():
    f = launch.parse_flags(["m", "--tensor_parallel_size=2", "-pp", "3", "--port", "9000",
                            "--kv-transfer-config.kv_connector", "NixlConnector",
                            "--kv-transfer-config.kv_role=kv_both"])
    assert (f.tp, f.pp, f.port) == ("2", "3", "9000")
    assert f.kv_transfer_dotted == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}


def test_script_split_handles_quotes_continuations_and_operators():
    cmds = launch.split_script("a 'b c' \"d $E\" \\\n f && g|h; i 2>&1 &\nj # k")
    assert [[w.text for w in c] for c in cmds] == [
        ["a", "b c", "d $E", "f"], ["g"], ["h"], ["i", "2>&1"], ["j"]]
    assert cmds[0][2].dynamic and not cmds[0][1].dynamic


@pytest.mark.parametrize("script,why", [
    ("cat <<EOF\nvllm serve m\nEOF", "here-document"),
    ("`which vllm` serve m", "backquote"),
    ("vllm serve a & vllm serve b", "2 times"),
    ("echo 'unterminated", "unterminated single quote"),
    ("X=$(vllm serve m)", "command substitution"),
])
def test_unsafe_scripts_are_refused_with_the_reason(script, why):
    with pytest.raises(launch.ScriptError, match=why):
        launch.find_in_script(script)


def test_insert_goes_after_last_argument_before_redirections():
    s = "exec vllm serve m --port 8000 > /tmp/log 2>&1 | tee x"
    out = launch.insert_into_script(s, launch.find_in_script(s), "--k", '{"a":1}')
    assert out == "exec vllm serve m --port 8000 --k '{\"a\":1}' > /tmp/log 2>&1 | tee x"
    # The edited script still parses to the same command plus the flag.
    words = [w.text for w in launch.find_in_script(out).words]
    assert words[:7] == ["exec", "vllm", "serve", "m", "--port", "8000", "--k"]
    assert words[7] == '{"a":1}'


def test_args_only_only_for_images_whose_entrypoint_is_the_server():
    # Issue 9 class 1: a name with "vllm" in it says nothing about the entrypoint.
    assert launch.classify((), ("--model", "m"), "vllm/vllm-openai:v0.10.1").form == "args-only"
    assert launch.classify((), ("--model", "m"), "docker.io/lmcache/vllm-openai:v0.3.9")
    for image in ("registry:5000/team/vllm-cpu@sha256:abc", "lmcache/lmstack-router:latest",
                  "vllm/production-stack-router:1", "redis:7",
                  "nvcr.io/nvidia/ai-dynamo/vllm-runtime:0.7.1"):
        assert launch.classify((), ("-m", "dynamo.frontend"), image) is None, image
