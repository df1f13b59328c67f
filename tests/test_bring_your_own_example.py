"""examples/bring-your-own: the hospital's own image folders, Dataset, model and configs.

Fast: the generator writes the same bytes twice, with the label skew it promises; the
Dataset reads them back as the digits they came from; the model factory builds a
DP-compatible net that trains one private step on them; and the example's configs parse
(the launch config gives every hospital its own folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bring-your-own"
HOSPITALS = ["st-mary", "general", "childrens"]


def _load(path: Path, name: str):  # noqa: ANN202 - a module object
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A copy of the example (package, generator, configs) with its images generated, and the
    ``hospital`` package importable from it; the import is undone afterwards."""
    root = tmp_path_factory.mktemp("byo") / "bring-your-own"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("images", "runs", "__pycache__"))
    make_images = _load(root / "make_images.py", "byo_make_images")
    counts = make_images.make_images(root / "images")
    saved = {k: v for k, v in sys.modules.items() if k == "hospital" or k.startswith("hospital.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        yield {"root": root, "make_images": make_images, "counts": counts}
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k == "hospital" or k.startswith("hospital.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.modules.pop("byo_make_images", None)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_generator_writes_every_digit_once_deterministically_with_a_label_skew(example, tmp_path) -> None:
    images = example["root"] / "images"
    assert sorted(p.name for p in images.iterdir()) == sorted(HOSPITALS)
    again = example["make_images"].make_images(tmp_path / "again")
    assert again == example["counts"]
    first = _tree_digest(images)
    assert first == _tree_digest(tmp_path / "again")  # byte-identical PNGs, same names
    assert len(first) == 1797  # every digit of scikit-learn's set, once
    names = [Path(k).name for k in first]
    assert len(set(names)) == 1797  # no image at two hospitals, nor in both splits
    for h, name in enumerate(HOSPITALS):
        for split in ("train", "test"):
            labels = [int(p.parent.name) for p in (images / name / split).glob("*/*.png")]
            assert len(labels) == example["counts"][name][split] > 0
            assert set(labels) == set(range(10))  # every hospital sees every digit ...
        train = Counter(int(p.parent.name) for p in (images / name / "train").glob("*/*.png"))
        home = {d for d in range(10) if d % 3 == h}
        for d in range(10):  # ... but mostly its own: 60 % of its home digits, 20 % of the others
            share = train[d] / sum(c[d] for c in (Counter(int(p.parent.name) for p in
                                                            (images / o / "train").glob("*/*.png"))
                                                    for o in HOSPITALS))
            assert (share > 0.5) if d in home else (0.1 < share < 0.3), (name, d, share)
        test = example["counts"][name]["test"]
        assert 0.15 < test / (test + example["counts"][name]["train"]) < 0.25
    # another seed is another shuffle
    example["make_images"].make_images(tmp_path / "other", seed=1)
    assert set(_tree_digest(tmp_path / "other")) != set(first)


def test_the_dataset_reads_back_the_digits_it_was_made_from(example) -> None:
    from hospital.data import HospitalImages, load_site

    digits = load_digits()
    root = example["root"] / "images"
    train, test = load_site(site_index=1, num_sites=3, root=str(root / "general"))
    assert isinstance(train, HospitalImages) and isinstance(test, HospitalImages)
    assert len(train) == example["counts"]["general"]["train"]
    assert len(test) == example["counts"]["general"]["test"]
    for ds in (train, test):
        for i in (0, len(ds) // 2, len(ds) - 1):
            x, y = ds[i]
            assert isinstance(y, int) and 0 <= y <= 9
            assert x.shape == (1, 8, 8) and x.dtype == torch.float32
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
            index = int(ds.samples[i][0].stem)  # files are named by their index in the digits set
            assert y == int(digits.target[index])
            np.testing.assert_allclose(x[0].numpy(), digits.images[index] / 16.0, atol=0.5 / 255 + 1e-6)
    # compare's way: one root for every site, the factory picks hospital i's folder
    for i, name in enumerate(HOSPITALS):
        tr, te = load_site(site_index=i, num_sites=3, root=str(root), hospitals=HOSPITALS)
        assert (len(tr), len(te)) == (example["counts"][name]["train"], example["counts"][name]["test"])
        assert tr.root == root / name
    big, _ = load_site(site_index=0, num_sites=3, root=str(root / "st-mary"), image_size=16)
    assert big[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="3 sites"):
        load_site(site_index=0, num_sites=3, root=str(root), hospitals=HOSPITALS[:2])
    with pytest.raises(FileNotFoundError, match="make_images"):
        HospitalImages(root / "nowhere", "train")


def test_the_model_builds_without_batchnorm_and_trains_one_private_step(example) -> None:
    from hospital.data import load_site
    from hospital.model import make_loss, make_net

    from privfl import PrivacyEngine
    from privfl.models import build_model

    net = build_model("hospital.model:make_net", (1, 8, 8), 10, seed=0, args={"image_size": 8, "num_classes": 10})
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert net(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert make_net(image_size=16)(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    loss = make_loss()
    assert loss.reduction == "mean"
    train, _ = load_site(site_index=2, num_sites=3, root=str(example["root"] / "images" / "childrens"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    engine = PrivacyEngine(seed=0)
    model, opt, loader = engine.make_private(
        module=net, optimizer=torch.optim.AdamW(net.parameters(), lr=0.01),
        data_loader=DataLoader(train, batch_size=48),
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, target_epsilon=3.0, delta=1e-5)
    x, y = next(iter(loader))
    opt.zero_grad()
    loss(model(x), y).backward()
    opt.step()
    assert engine.steps == 1 and 0 < engine.get_epsilon(1e-5) < 3.0
    after = net.state_dict()
    assert set(after) == set(before)  # the model's own parameter names (what final_model.pt holds)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_the_example_configs_parse_and_give_each_hospital_its_own_folder(example) -> None:
    from privfl.experiment import load_experiment
    from privfl.launch import load_consortium, prepare_run

    root = example["root"]
    _table, cons, pol = load_consortium(root / "consortium.toml")
    assert cons.nodes == HOSPITALS and pol.max_epsilon == 3.0
    plan = prepare_run(root / "consortium.toml", runs_dir=root / "runs", run_name="parse")
    for nid in HOSPITALS:
        node = tomllib.loads(plan.node_configs[nid].read_text())
        data = node["data"]
        assert data["factory"] == "hospital.data:load_site"
        folder = Path(data["root"])
        folder = folder if folder.is_absolute() else plan.node_configs[nid].parent / folder
        assert folder.resolve() == (root / "images" / nid).resolve()
        assert node["dp"]["optimizer"] == "adamw"
    exp = load_experiment(root / "compare.toml")
    assert exp.common.data.num_sites == 3
    assert {"async_gossip", "fedavg"} <= set(exp.strategies)
    assert exp.common.model.factory == "hospital.model:make_net"


def test_the_readme_loads_a_final_model_into_the_hospitals_own_module(example, tmp_path, capsys) -> None:
    import re

    from hospital.model import make_net

    final = tmp_path / "final_model.pt"
    torch.save(make_net(image_size=8, num_classes=10).state_dict(), final)  # what a run writes
    readme = (EXAMPLE / "README.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    path = re.search(r'torch\.load\("([^"]+)"', snippet).group(1)
    image = re.search(r'Image\.open\("([^"]+)"\)', snippet).group(1)
    assert (example["root"] / image).is_file(), image  # the README names an image make_images.py writes
    code = snippet.replace(path, str(final)).replace(image, str(example["root"] / image))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own snippet
    assert capsys.readouterr().out.strip() in {str(d) for d in range(10)}
