"""Hostile or malformed config YAML (issue 9, item 1): each is refused fast with one ConfigError line
naming the file, the line and the fix; ordinary anchors, merge keys and comments still load.

The worst cases (an alias bomb, 10,000-deep nesting, a 50 MB file) are also run through the CLI in
subprocesses with a timeout, so a regression that hangs or exhausts memory fails instead of stalling.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import meshweave.core.yaml_safe as yaml_safe
from meshweave.core.config import ConfigError
from meshweave.core.yaml_safe import MAX_ALIASES, MAX_BYTES, MAX_DEPTH, MAX_NODES, YamlRefused, load_yaml_config
from meshweave.train.config import load_config  # core's load_config with the model registry bound

REPO = Path(__file__).resolve().parents[1]

# Nine aliases per level, nine levels: 9**9 (~387 million) leaves once expanded, 250 bytes written.
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
# The merge-key variant: PyYAML copies merged pairs, so each level multiplies the pair list by nine.
MERGE_BOMB = "m0: &m0 {k: 1, j: 2}\n" + "".join(
    f"m{i + 1}: &m{i + 1} {{<<: [{', '.join([f'*m{i}'] * 9)}]}}\n" for i in range(12))
DEEP = 10_000


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _refused(path, *fragments):
    """load_config(path) raises a ConfigError of one line naming the file and the given fragments."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"{path}: "), message
    assert "; " in message, f"no fix after the problem: {message}"  # every message ends "...; <what to do>"
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- size and encoding: checked before any YAML is parsed -----------------------------------------------------

def test_a_50_mb_file_is_refused_by_its_size(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: costs no disk, stat still says 50 MB
    _refused(path, f"52428800 bytes is over the {MAX_BYTES} byte limit", "pass the config itself")


def test_one_byte_over_the_limit_is_refused_and_the_limit_itself_loads(tmp_path):
    comment = b"# padding to the size limit\n"
    body = comment * (MAX_BYTES // len(comment))
    at_limit = _write(tmp_path, body + b"#" * (MAX_BYTES - len(body) - 1) + b"\n", "at_limit.yaml")
    assert at_limit.stat().st_size == MAX_BYTES
    assert load_config(at_limit) == load_config(None)
    over = _write(tmp_path, at_limit.read_bytes() + b"\n", "over.yaml")
    _refused(over, f"{MAX_BYTES + 1} bytes is over the {MAX_BYTES} byte limit")


def test_latin1_bytes_are_refused_with_line_and_byte_offset(tmp_path):
    path = _write(tmp_path, "model:\n  dim: 64\nrun_dir: runs/caf\xe9\n".encode("latin-1"))
    _refused(path, "line 3, column 18 (byte offset 34): byte 0xe9 is not UTF-8", "save the file as UTF-8")


def test_utf16_is_refused_with_a_hint(tmp_path):
    path = _write(tmp_path, "model: {dim: 64}\n".encode("utf-16"))
    _refused(path, "line 1", "is not UTF-8 (it looks like UTF-16)", "save the file as UTF-8")


def test_a_control_character_is_refused_with_line_and_column(tmp_path):
    path = _write(tmp_path, "model:\n  dim: 6\x004\n")
    _refused(path, "line 2, column 9: character '\\x00' is not allowed in YAML", "delete it")


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    path = _write(tmp_path, "\ufeffmodel: {dim: 128}\n".encode("utf-8"))
    assert load_config(path).model.dim == 128


# --- aliases: budgets on references, expanded size and cycles --------------------------------------------------

def test_billion_laughs_is_refused_before_expanding(tmp_path):
    path = _write(tmp_path, LAUGHS)
    _refused(path, "line 5: alias *d expands the file past", f"{MAX_NODES} values", "write the values out")


def test_merge_key_bomb_is_refused_before_expanding(tmp_path):
    path = _write(tmp_path, MERGE_BOMB)
    _refused(path, "line 5: alias *m3 expands the file past", "alias bomb")


def test_too_many_alias_references_are_refused(tmp_path):
    refs = ", ".join(["*v"] * (MAX_ALIASES + 1))
    path = _write(tmp_path, f"value: &v 1\nmany: [{refs}]\n")
    _refused(path, f"line 2: more than {MAX_ALIASES} aliases (*name)", "write these values out")


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    path = _write(tmp_path, "model: {dim: 64}\nloop: &loop {next: *loop}\n")
    _refused(path, "line 2: alias *loop is inside the node it names (a cycle)", "remove the alias")


def test_aliases_cannot_stack_nesting_past_the_depth_limit(tmp_path):
    # Each level is 4 deep as written; through the aliases it reaches 4 * 20 levels.
    text = "a0: &a0 [1]\n" + "".join(f"a{i + 1}: &a{i + 1} [[[[*a{i}]]]]\n" for i in range(20))
    path = _write(tmp_path, text)
    _refused(path, "line 9: alias *a7 nests values more than 32 levels deep", "flatten it")


def test_an_undefined_alias_names_line_and_column(tmp_path):
    path = _write(tmp_path, "model:\n  dim: *size\n")
    _refused(path, "not valid YAML at line 2, column 8: found undefined alias 'size'", "fix the YAML there")


# --- nesting: refused while composing, never a RecursionError ---------------------------------------------------

@pytest.mark.parametrize("name,text,line", [
    ("flow lists", "model: " + "[" * DEEP + "]" * DEEP + "\n", 1),
    ("flow maps", "model: " + "{a: " * DEEP + "1" + "}" * DEEP + "\n", 1),
    ("block lists", "model:\n" + "- " * DEEP + "1\n", 2),
    ("block maps", "".join(" " * i + "a:\n" for i in range(1000)), MAX_DEPTH),
])
def test_deep_nesting_is_refused_without_recursion_error(tmp_path, name, text, line):
    path = _write(tmp_path, text)
    _refused(path, f"line {line}: values are nested more than {MAX_DEPTH} levels deep", "flatten it")


def test_the_depth_limit_is_exact():
    def nested(maps):  # the top-level mapping, `maps` nested mappings, then a scalar one level below
        return "a: " + "{a: " * maps + "1" + "}" * maps + "\n"

    assert _load_text(nested(MAX_DEPTH - 2)) is not None
    with pytest.raises(YamlRefused, match=f"line 1: values are nested more than {MAX_DEPTH} levels deep"):
        _load_text(nested(MAX_DEPTH - 1))


def test_too_many_values_are_refused(tmp_path):
    path = _write(tmp_path, "checkpoint:\n  levels: [" + ", ".join(["local"] * MAX_NODES) + "]\n")
    _refused(path, f"line 2: more than {MAX_NODES} values in one file", "not a data file")


# --- duplicate keys ----------------------------------------------------------------------------------------------

def test_a_duplicated_key_names_both_lines(tmp_path):
    path = _write(tmp_path, "model:\n  dim: 64\n  n_heads: 4\n  dim: 128\n")
    _refused(path, "line 4: key 'dim' appears twice in one mapping (first at line 2)", "keep one of them")


def test_a_duplicated_section_names_both_lines(tmp_path):
    path = _write(tmp_path, "model: {dim: 64}\ntrain: {steps: 3}\nmodel: {dim: 128}\n")
    _refused(path, "line 3: key 'model' appears twice in one mapping (first at line 1)")


def test_quoting_does_not_hide_a_duplicate(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 3\n  'steps': 4\n")
    _refused(path, "line 3: key 'steps' appears twice in one mapping (first at line 2)")


def test_duplicates_inside_a_flow_list_of_maps(tmp_path):
    path = _write(tmp_path, "checkpoint:\n  levels: [{a: 1,\n    a: 2}]\n")
    _refused(path, "line 3: key 'a' appears twice in one mapping (first at line 2)")


# --- document shape and syntax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,kind", [("- model\n- train\n", "a list"), ("just a string\n", "a string"),
                                       ("42\n", "int")])
def test_the_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = _write(tmp_path, text)
    _refused(path, f"line 1: the top level must be a mapping of sections (model:, parallel:, ...), got {kind}")


def test_two_documents_are_refused(tmp_path):
    path = _write(tmp_path, "model: {dim: 64}\n---\nmodel: {dim: 128}\n")
    _refused(path, "line 2: a second YAML document starts here", "remove the `---`")


def test_a_syntax_error_names_line_and_column(tmp_path):
    path = _write(tmp_path, "model:\n  dim: 64\ntrain: {steps: [1, 2\n")
    _refused(path, "not valid YAML at line 4, column 1", "fix the YAML there")


def test_tab_indentation_names_line_and_column(tmp_path):
    path = _write(tmp_path, "model:\n\tdim: 64\n")
    _refused(path, "not valid YAML at line 2, column 1", "cannot start any token")


def test_python_tags_are_still_refused(tmp_path):
    path = _write(tmp_path, "model: !!python/object/apply:os.system ['true']\n")
    _refused(path, "not valid YAML at line 1, column 8: could not determine a constructor")


# --- good files keep loading as before ------------------------------------------------------------------------

def test_anchors_and_merge_keys_within_budget(tmp_path):
    path = _write(tmp_path, """\
# shared model shape
x-shape: &shape {dim: 128, n_heads: 4}   # an anchor for reuse
model:
  <<: *shape
  dim: 192          # overrides the merged value: not a duplicate
  n_kv_heads: 2
train: &train {steps: 5}
""")
    raw = load_yaml_config(path)
    assert raw["model"] == {"dim": 192, "n_heads": 4, "n_kv_heads": 2} and raw["x-shape"]["dim"] == 128
    with pytest.raises(ConfigError, match="x-shape"):  # the schema, not the reader, rejects the extra section
        load_config(path)
    del raw["x-shape"]
    path.write_text(yaml.safe_dump(raw) + "checkpoint: {levels: &lv [memory, local]}\n")
    cfg = load_config(path)
    assert (cfg.model.dim, cfg.model.n_heads, cfg.train.steps) == (192, 4, 5)
    assert cfg.checkpoint.levels == ["memory", "local"]


def test_a_list_of_merges_and_repeated_aliases_within_budget():
    raw = _load_text("a: &a {x: 1, y: 2}\nb: &b {y: 3}\nc: {<<: [*a, *b], z: 4}\nd: [*a, *a, *b]\n")
    assert raw["c"] == {"x": 1, "y": 2, "z": 4} and raw["d"] == [{"x": 1, "y": 2}] * 2 + [{"y": 3}]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "~\n", "---\n"])
def test_empty_or_comment_only_files_give_the_defaults(tmp_path, text):
    assert load_config(_write(tmp_path, text)) == load_config(None)


def test_shipped_configs_read_the_same_as_safe_load():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        assert load_yaml_config(path) == yaml.safe_load(path.read_text()), path


def test_value_semantics_are_pyyaml_safe_load():
    text = "a: 1e-3\nb: 3.0e-3\nc: yes\nd: 0o17\ne: 017\nf: 2024-01-02\ng: null\nh: '1'\n"
    assert _load_text(text) == yaml.safe_load(text)
    assert _load_text(text)["a"] == "1e-3"  # YAML 1.1: config.py converts it later


@pytest.mark.parametrize("text,fragment", [
    (LAUGHS, "alias *d expands"),
    (MERGE_BOMB, "alias *m3 expands"),
    ("model: " + "[" * DEEP + "\n", "nested more than"),
    ("a: {b: 1, b: 2}\n", "key 'b' appears twice"),
    ("a: 1\n---\nb: 2\n", "a second YAML document"),
])
def test_the_pure_python_parser_refuses_the_same(monkeypatch, text, fragment):
    """Without libyaml the same composer and constructor run on PyYAML's Python scanner and parser."""
    monkeypatch.setattr(yaml_safe, "USE_LIBYAML", False)
    with pytest.raises(YamlRefused, match=None) as info:
        _load_text(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_reader_imports_only_the_standard_library_and_yaml():
    tree = ast.parse(Path(yaml_safe.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots <= set(sys.stdlib_module_names) | {"yaml"}, roots


# --- the CLI: the worst cases exit 2 with one line, well inside a timeout --------------------------------------

CLI_CASES = {
    "laughs.yaml": (LAUGHS, "alias *d expands"),
    "deep.yaml": ("model: " + "{a: " * DEEP + "1" + "}" * DEEP + "\n", "nested more than"),
    "huge.yaml": (None, "byte limit"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run the three CLI cases at once (each subprocess spends most of its time importing torch)."""
    root = tmp_path_factory.mktemp("cli")
    procs = {}
    for name, (text, _) in CLI_CASES.items():
        path = root / name
        if text is None:
            with open(path, "wb") as f:
                f.truncate(50 * 1024 * 1024)
        else:
            path.write_text(text)
        procs[name] = (path, subprocess.Popen([sys.executable, "-m", "meshweave", "config", str(path)], cwd=REPO,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    try:
        for name, (path, proc) in procs.items():
            out, err = proc.communicate(timeout=120)  # minutes, then MemoryError, without the hardening
            results[name] = (path, proc.returncode, out, err)
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_refuses_the_worst_cases_with_one_line_and_exit_2(cli_results, name):
    path, returncode, out, err = cli_results[name]
    assert returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"meshweave: config error: {path}: ") and CLI_CASES[name][1] in lines[0], lines[0]
    assert out == ""


def _load_text(text):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.yaml"
        path.write_text(text)
        return load_yaml_config(path)
