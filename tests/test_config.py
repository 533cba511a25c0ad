"""node.toml loading: defaults, the documented example, and refusals."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from node.config import NodeConfig, load_config
from node.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


class TestExampleConfig:
    def test_example_documents_every_setting_with_its_default(self, tmp_path: Path) -> None:
        example = load_config(REPO / "node.example.toml")
        defaults = load_config(_write(tmp_path, 'origin = "hospital.example/imageshare"\n'))
        ignore = {"config_path", "data_dir"}
        assert {k: v for k, v in asdict(example).items() if k not in ignore} == {
            k: v for k, v in asdict(defaults).items() if k not in ignore
        }

    def test_every_section_is_in_the_example(self) -> None:
        text = (REPO / "node.example.toml").read_text()
        for name in NodeConfig.__dataclass_fields__:
            if name in {"origin", "config_path", "data_dir", "peers"}:
                continue
            assert f"[{name}]" in text, name


class TestRefusals:
    def test_unknown_setting_is_refused(self, tmp_path: Path) -> None:
        path = _write(tmp_path, 'origin = "a.example/x"\n[http]\nlisen = "1.2.3.4:1"\n')
        with pytest.raises(ConfigError, match=r"http\.lisen"):
            load_config(path)

    def test_missing_origin_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="origin"):
            load_config(_write(tmp_path, "[http]\n"))

    def test_bad_listen_address_is_refused(self, tmp_path: Path) -> None:
        path = _write(tmp_path, 'origin = "a.example/x"\n[http]\nlisten = "nowhere"\n')
        with pytest.raises(ConfigError, match="HOST:PORT"):
            load_config(path)

    @pytest.mark.parametrize("limit", ["0", "-1", "1.5", "true", '"60"'])
    def test_denial_rate_limit_must_be_a_positive_whole_number(
        self, tmp_path: Path, limit: str
    ) -> None:
        path = _write(
            tmp_path, f'origin = "a.example/x"\n[consent]\nmax_denials_per_minute = {limit}\n'
        )
        with pytest.raises(ConfigError, match="max_denials_per_minute"):
            load_config(path)

    @pytest.mark.parametrize("ratio", ["0.5", "nan", '"100"', "true"])
    def test_inflation_ratio_below_one_or_not_a_number_is_refused(
        self, tmp_path: Path, ratio: str
    ) -> None:
        path = _write(tmp_path, f'origin = "a.example/x"\n[store]\nmax_inflation_ratio = {ratio}\n')
        with pytest.raises(ConfigError, match="max_inflation_ratio"):
            load_config(path)

    def test_missing_file_names_the_fix(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="imageshare init"):
            load_config(tmp_path / "absent.toml")

    def test_peers_are_read(self, tmp_path: Path) -> None:
        path = _write(
            tmp_path,
            'origin = "a.example/x"\n[[peers]]\norigin = "b.example/x"\nurl = "http://b"\n'
            'vkey = "b.example/x+00000000+AA"\n',
        )
        assert load_config(path).peers[0].origin == "b.example/x"
