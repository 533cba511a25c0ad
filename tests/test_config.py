"""node.toml loading: defaults, the documented example, and refusals through the real CLI."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from node.config import NodeConfig, Table, load_config
from node.errors import ConfigError
from tests.support.nodes import run_cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "node.example.toml"
ORIGIN = 'origin = "a.example/x"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def _settings(config: NodeConfig) -> dict[str, object]:
    """Everything the file sets, without the data directory it was found in."""
    document: dict[str, object] = msgspec.structs.asdict(config)
    del document["data_dir"]
    return document


def _uncommented_example_tables() -> str:
    """node.example.toml with its commented-out example tables ([[peers]] etc.) enabled."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        if re.fullmatch(r"# (\[\[[a-z.]+\]\]|[a-z0-9_]+ = .*)", line):
            line = line[2:].split("  #")[0]
        lines.append(line)
    return "\n".join(lines) + "\n"


class TestExampleConfig:
    def test_example_is_valid_and_shows_every_default(self, tmp_path: Path) -> None:
        example = load_config(EXAMPLE)
        defaults = load_config(_write(tmp_path, 'origin = "hospital.example/imageshare"\n'))
        assert _settings(example) == _settings(defaults)
        assert example.data_dir == REPO

    def test_example_tables_in_comments_are_valid(self, tmp_path: Path) -> None:
        config = load_config(_write(tmp_path, _uncommented_example_tables()))
        assert [c.ae_title for c in config.dimse.callers] == ["PACS"]
        assert [d.port for d in config.dimse.destinations] == [104]
        assert [p.origin for p in config.peers] == ["other.example/imageshare"]

    def test_example_documents_every_key_of_every_table(self) -> None:
        text = _uncommented_example_tables()
        for table in _all_tables(Table):
            for field in msgspec.structs.fields(table):
                key = field.encode_name
                shown = rf"^({key} = |\[([a-z]+\.)?{key}\]|\[\[([a-z]+\.)?{key}\]\])"
                assert re.search(shown, text, re.MULTILINE), f"{table.__name__}.{key}"

    def test_every_section_is_in_the_example(self) -> None:
        text = EXAMPLE.read_text()
        for field in msgspec.structs.fields(NodeConfig):
            if field.name in {"origin", "data_dir", "peers"}:
                continue
            assert f"[{field.name}]" in text, field.name


def _all_tables(cls: type[Table]) -> list[type[Table]]:
    found: list[type[Table]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_tables(sub)]
    return found


# (node.toml after the origin line, the sentence on stderr after "imageshare: node.toml: ")
REFUSED = [
    ('[http]\nlisen = "1.2.3.4:1"\n', "[http] lisen: unknown setting"),
    ("colour = 1\n", "colour: unknown setting"),
    ('[http]\n"my key" = 1\n', "[http] my key: unknown setting"),
    ('[dimse]\nport = "abc"\n', '[dimse] port: expected an integer, got "abc"'),
    ("[dimse]\nport = 70000\n", "[dimse] port: expected an integer <= 65535, got 70000"),
    ("[dimse]\nenabled = 1\n", "[dimse] enabled: expected true or false, got 1"),
    ('[http]\nlisten = "nowhere"\n', "[http] listen: must be HOST:PORT"),
    ('[http]\nlisten = "127.0.0.1:\u0668\u0666\u0660\u0660"\n', "[http] listen: must be HOST:PORT"),
    ("[http]\nclient_timeout = 0\n", "[http] client_timeout: expected a number > 0.0, got 0"),
    ("[http]\nclient_timeout = inf\n", "[http] client_timeout: expected a number <= 86400"),
    ("[http]\nclient_timeout = nan\n", "[http] client_timeout: expected a number > 0.0, got nan"),
    ('[http]\ncors_origins = ["*"]\n', "[http] cors_origins: '*' is not an origin"),
    ("[http]\ncors_origins = [5]\n", "[http] cors_origins #1: expected a string, got 5"),
    ('[http]\ncert_file = "tls/cert.pem"\n', "[http] cert_file: goes together with key_file"),
    ("[http]\nhsts_max_age = -1\n", "[http] hsts_max_age: expected an integer >= 0, got -1"),
    ("http = 5\n", "http: expected a table, got 5"),
    ("data_dir = 5\n", "data_dir: expected a string, got 5"),
    ("[store]\nbatch_size = 0\n", "[store] batch_size: expected an integer >= 1, got 0"),
    ("[store]\nmax_inflation_ratio = 0.5\n", "[store] max_inflation_ratio:"),
    ("[store]\nmax_inflation_ratio = nan\n", "[store] max_inflation_ratio:"),
    ('[store]\nmax_inflation_ratio = "100"\n', "[store] max_inflation_ratio:"),
    ("[store]\nmax_inflation_ratio = true\n", "[store] max_inflation_ratio:"),
    ("[consent]\nmax_denials_per_minute = true\n", "[consent] max_denials_per_minute:"),
    ("[consent]\nmax_denials_per_minute = 1.5\n", "[consent] max_denials_per_minute:"),
    ('[consent]\nmax_denials_per_minute = "60"\n', "[consent] max_denials_per_minute:"),
    ("[consent]\nmax_denials_per_minute = 0\n", "[consent] max_denials_per_minute:"),
    ('[dimse]\nae_title = "SEVENTEEN-LETTERS"\n', "[dimse] ae_title: 'SEVENTEEN-LETTERS'"),
    ('[forward]\nae_title = "PACS"\n', "[forward] host: forwarding to 'PACS' needs its host"),
    ('[pacs]\nae_title = "PACS"\n', "[pacs] host: the PACS 'PACS' needs its host"),
    ('[pacs]\ndicomweb_url = "pacs.local/dicom-web"\n', "[pacs] dicomweb_url: must be an http"),
    ('[federation]\nmirror_also = ["x y"]\n', "[federation] mirror_also: not node origins: x y"),
    ('[pacs]\ndicomweb_auth_header = "Bearer x"\n', '[pacs] dicomweb_auth_header: must be "Name'),
    ("[pacs]\ncache_bytes = 0\n", "[pacs] cache_bytes:"),
    ('[pacs]\nca_file = "ca.pem"\n', "[pacs] tls: must be true"),
    ("[witness]\nthreshold = 100\n", "[witness] threshold: at most 99"),
    (
        '[[peers]]\norigin = "b.example/x"\nurl = "http://b"\nvkey = "k"\nextra = 1\n',
        "[[peers]] #1 extra: unknown setting",
    ),
    ('[[peers]]\norigin = "b.example/x"\n', "[[peers]] #1 url: missing; it is required"),
    (
        '[[peers]]\norigin = "b+x"\nurl = "http://b"\nvkey = "k"\n',
        "[[peers]] #1 origin: 'b+x' is not a node origin",
    ),
    (
        '[[dimse.callers]]\nae_title = "PACS"\nhost = "10.0.0.5"\nquery_retrive = false\n',
        "[[dimse.callers]] #1 query_retrive: unknown setting",
    ),
    (
        '[[dimse.callers]]\nae_title = "PACS"\nhost = "pacs.local"\n',
        "[[dimse.callers]] #1 host: must be the IP address",
    ),
    (
        '[[dimse.destinations]]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = "104"\n',
        '[[dimse.destinations]] #1 port: expected an integer, got "104"',
    ),
    (
        '[dimse]\nallowed_calling_aes = ["X"]\n'
        '[[dimse.callers]]\nae_title = "PACS"\nhost = "10.0.0.5"\n',
        "[dimse] callers: 'PACS' is not in allowed_calling_aes",
    ),
]


class TestRefusalsThroughTheCli:
    @pytest.mark.parametrize(("settings", "sentence"), REFUSED)
    def test_run_stops_with_one_sentence_naming_the_key(
        self, tmp_path: Path, settings: str, sentence: str
    ) -> None:
        path = _write(tmp_path, ORIGIN + settings)
        result = run_cli("run", config=path, check=False, timeout=60)
        assert result.returncode == 2
        assert result.stderr.startswith(f"imageshare: node.toml: {sentence}"), result.stderr
        assert result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr

    @pytest.mark.parametrize("origin", ['"a b"', '"ab"', '"x+y.example/n"', "5", '""'])
    def test_bad_origin_stops_run(self, tmp_path: Path, origin: str) -> None:
        path = _write(tmp_path, f"origin = {origin}\n")
        result = run_cli("run", config=path, check=False, timeout=60)
        assert result.returncode == 2
        assert result.stderr.startswith("imageshare: node.toml: origin: ")
        assert result.stderr.count("\n") == 1

    def test_missing_origin_stops_run(self, tmp_path: Path) -> None:
        result = run_cli("run", config=_write(tmp_path, "[http]\n"), check=False, timeout=60)
        assert result.returncode == 2
        assert result.stderr == "imageshare: node.toml: origin: missing; it is required.\n"

    def test_invalid_toml_stops_run(self, tmp_path: Path) -> None:
        result = run_cli("run", config=_write(tmp_path, "origin = = 1\n"), check=False)
        assert result.returncode == 2
        assert result.stderr.startswith("imageshare: node.toml: not valid TOML")

    @pytest.mark.parametrize("command", [["import", "."], ["ledger", "verify"], ["peers", "list"]])
    def test_every_command_that_loads_the_config_refuses_it(
        self, tmp_path: Path, command: list[str]
    ) -> None:
        path = _write(tmp_path, ORIGIN + "[store]\nbatch_size = -1\n")
        result = run_cli(*command, config=path, check=False, timeout=60)
        assert result.returncode == 2
        assert result.stderr.startswith("imageshare: node.toml: [store] batch_size: ")


class TestLoading:
    def test_missing_file_names_the_fix(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="imageshare init"):
            load_config(tmp_path / "absent.toml")

    def test_peers_are_read(self, tmp_path: Path) -> None:
        path = _write(
            tmp_path,
            ORIGIN + '[[peers]]\norigin = "b.example/x"\nurl = "http://b"\n'
            'vkey = "b.example/x+00000000+AA"\n',
        )
        assert load_config(path).peers[0].origin == "b.example/x"

    def test_data_dir_is_relative_to_the_file(self, tmp_path: Path) -> None:
        path = _write(tmp_path, ORIGIN + 'data_dir = "state"\n')
        assert load_config(path).data_dir == tmp_path.resolve() / "state"

    def test_integers_are_taken_for_seconds(self, tmp_path: Path) -> None:
        path = _write(tmp_path, ORIGIN + "[federation]\nrequest_timeout = 3\n")
        assert load_config(path).federation.request_timeout == 3.0

    def test_cors_origins_are_lower_cased(self, tmp_path: Path) -> None:
        path = _write(tmp_path, ORIGIN + '[http]\ncors_origins = ["HTTPS://Viewer.Example"]\n')
        assert load_config(path).http.cors_origins == ["https://viewer.example"]
