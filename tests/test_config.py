import dataclasses

import pytest

from engine.config import SECTIONS, Config, load_config, parse_override
from engine.errors import ConfigError


def test_defaults_match_the_report():
    cfg = load_config()
    assert (cfg.camera.width, cfg.camera.height, cfg.camera.fps) == (800, 150, 500.0)
    fe = cfg.frontend
    assert (fe.bg_frames, fe.bg_sigma, fe.threshold, fe.min_area) == (100, 4.0, 2.0, 50)
    assert cfg.chip.constriction_width_um == 5.0


def test_default_yaml_lists_every_key():
    # configs/default.yaml documents every key: nothing only in code.
    import yaml
    from engine.config import default_config_path
    data = yaml.safe_load(default_config_path().read_text())
    for name, cls in SECTIONS.items():
        assert set(data[name]) == {f.name for f in dataclasses.fields(cls)}, name


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("frontend:\n  treshold: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*frontend\.treshold"):
        load_config(p)


def test_unknown_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("frontnd:\n  threshold: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*frontnd"):
        load_config(p)


@pytest.mark.parametrize("text, key", [
    ("frontend:\n  min_area: ten\n", "frontend.min_area"),
    ("frontend:\n  threshold: -1\n", "frontend.threshold"),
    ("camera:\n  fps: 0\n", "camera.fps"),
    ("ring:\n  policy: sometimes\n", "ring.policy"),
    ("frontend:\n  rejoin: 1\n", "frontend.rejoin"),
    ("sim:\n  fetal_fraction: 1.5\n", "sim.fetal_fraction"),
])
def test_wrong_type_or_impossible_value(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(p)


def test_not_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("frontend: [unclosed\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(p)


def test_file_layers_over_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("frontend:\n  threshold: 3.5\n")
    cfg = load_config(p)
    assert cfg.frontend.threshold == 3.5
    assert cfg.frontend.min_area == 50
    assert str(p) in cfg.source


def test_command_line_overrides():
    cfg = load_config(overrides=["frontend.threshold=4", "ring.policy=block", "sim.seed=7"])
    assert cfg.frontend.threshold == 4.0 and cfg.ring.policy == "block" and cfg.sim.seed == 7
    with pytest.raises(ConfigError, match="command line: unknown key frontend.nope"):
        load_config(overrides=["frontend.nope=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("threshold")


def test_replace_validates():
    cfg = Config().replace(frontend={"threshold": 3})
    assert cfg.frontend.threshold == 3.0
    with pytest.raises(ConfigError, match="frontend.min_area"):
        Config().replace(frontend={"min_area": 0})


def test_geometry_from_chip():
    g = load_config().geometry()
    assert g.width == 800 and g.height == 150
    assert g.region(10) == "inlet" and g.region(400) == "constriction" and g.region(700) == "outlet"
    assert g.constriction_halfwidth == pytest.approx(2.5 / 0.23)
