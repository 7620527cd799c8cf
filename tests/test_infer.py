"""Tiled conv-net inference equals whole-image inference (DESIGN contract 1)."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import torch
from distributed import Client, Nanny, Scheduler, SpecCluster, get_task_stream
from scipy import ndimage as ndi

from pipeline.convnet.inference import (
    InferenceSettings,
    median_diameter,
    model_load_count,
    predict_maps,
    predict_maps_tiled,
)
from pipeline.convnet.receptive_field import measure_receptive_field_radius, measure_stride
from pipeline.convnet.training import read_name_list
from pipeline.convnet.unet import UNet
from pipeline.convnet.weights import ModelInfo, load_model, save_model
from pipeline.orchestration.field import persist_on_gpu_workers


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> str:
    """An untrained U-Net with non-trivial batch-norm statistics, saved like a shipped model."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, depth=3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    model.eval()
    info = ModelInfo(
        architecture=model.config,
        diameter_px=30.0,
        percentiles=(1.0, 99.9),
        receptive_field_radius_px=measure_receptive_field_radius(model),
        stride=measure_stride(model),
    )
    assert (info.receptive_field_radius_px, info.stride) == (51, 8)
    path = tmp_path_factory.mktemp("model") / "random_unet"
    save_model(model, info, path)
    return str(path)


def _blobs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = ndi.gaussian_filter(rng.random(shape), 4) * 4000 + rng.normal(0, 30, shape) + 500
    return np.clip(image, 0, 65535).astype(np.uint16)


def test_weights_load_with_weights_only(random_model):
    state = torch.load(random_model + ".pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model, info = load_model(random_model)
    assert not model.training
    assert len(info.weights_sha256) == 64


@pytest.mark.slow
def test_shipped_model_loads_with_weights_only_and_matches_its_record():
    import importlib.resources

    path = importlib.resources.files("pipeline.convnet") / "nuclei_unet.pt"
    state = torch.load(str(path), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert path.stat().st_size < 8 * 2**20
    model, info = load_model()
    # the record's receptive field and stride are what the network measures now
    assert info.receptive_field_radius_px == measure_receptive_field_radius(model)
    assert info.stride == measure_stride(model) == model.stride
    # the held-out images of the accuracy figures were never trained on: the CTC frames and
    # the committed dsb2018 validation split
    split = importlib.resources.files("pipeline.convnet") / "recipes" / "dsb2018_validation.txt"
    held_out = {"gowt1/t21.tif", "gowt1/t72.tif", "hela/t52.tif", "hela/t79.tif"}
    held_out |= set(read_name_list(str(split)))
    assert len(held_out) == 4 + 89
    assert set(info.training["excluded"]) == held_out
    assert not held_out & {image["name"] for image in info.training["images"]}


@pytest.mark.parametrize(
    ("chunks", "tile_px", "diameter", "tta"),
    [
        ((64, 64), 64, None, False),
        ((100, 90), 64, None, True),
        ((77, 53), 128, 20.0, False),
        ((300, 270), 64, 45.0, False),
        ((150, 270), 96, 24.0, True),
    ],
)
def test_tiled_inference_equals_whole_image(random_model, chunks, tile_px, diameter, tta):
    frames = np.stack([_blobs((300, 270), seed) for seed in (1, 2)])
    settings = InferenceSettings(model=random_model, tile_px=tile_px, batch_size=3, tta=tta)
    whole = np.stack(
        [predict_maps(frame, diameter=diameter, settings=settings) for frame in frames]
    )
    lazy = predict_maps_tiled(
        da.from_array(frames, chunks=(1, *chunks)), diameter=diameter, settings=settings
    )
    with dask.config.set(scheduler="threads"):
        tiled = lazy.compute()
    assert tiled.shape == whole.shape == (2, 4, 300, 270)
    assert np.abs(tiled - whole).max() <= 1e-5
    # the network really ran on several tiles per frame
    layers = [name for name in lazy.dask.layers if name.startswith("infer-")]
    assert len(layers) == 1
    assert len(lazy.dask.layers[layers[0]]) > 2 * len(frames)


def test_tiled_inference_3d_runs_slice_by_slice(random_model):
    stack = _blobs((5, 120, 100), 3)
    settings = InferenceSettings(model=random_model, tile_px=64)
    whole = predict_maps(stack, diameter=25.0, settings=settings)
    assert whole.shape == (4, 5, 120, 100)
    # each z slice is an independent 2D pass, normalised by the whole stack's percentiles
    tiled = predict_maps_tiled(
        da.from_array(stack[np.newaxis], chunks=(1, 2, 50, 40)), diameter=25.0, settings=settings
    ).compute(scheduler="threads")
    assert np.abs(tiled[0] - whole).max() <= 1e-5


def test_tiled_inference_keeps_the_maps_asked_for_in_their_order(random_model):
    frame = _blobs((150, 140), 6)
    settings = InferenceSettings(model=random_model, tile_px=64)
    whole = predict_maps(frame, diameter=24.0, settings=settings)
    kept = predict_maps_tiled(
        da.from_array(frame[np.newaxis], chunks=(1, 70, 70)),
        diameter=24.0,
        settings=settings,
        channels=(3, 0),
    )
    assert kept.chunks[1] == (2,)
    assert np.abs(kept.compute(scheduler="threads")[0] - whole[[3, 0]]).max() <= 1e-5


def test_halo_smaller_than_receptive_field_breaks_equality(random_model, tmp_path):
    """The check has teeth: a model that under-reports its receptive field gets seams."""
    model, info = load_model(random_model)
    liar = tmp_path / "liar"
    save_model(model, ModelInfo(**{**info.__dict__, "receptive_field_radius_px": 8}), liar)
    frame = _blobs((200, 200), 4)
    settings = InferenceSettings(model=str(liar), tile_px=64)
    whole = predict_maps(frame, settings=settings)
    tiled = predict_maps_tiled(
        da.from_array(frame[np.newaxis], chunks=(1, 64, 64)), settings=settings
    ).compute(scheduler="threads")[0]
    assert np.abs(tiled - whole).max() > 1e-5


def test_probabilities_sum_to_one(random_model):
    maps = predict_maps(_blobs((64, 64), 5), settings=InferenceSettings(model=random_model))
    np.testing.assert_allclose(maps[:3].sum(axis=0), 1.0, atol=1e-5)


def test_median_diameter_of_discs():
    labels = np.zeros((100, 100), dtype=np.int32)
    yy, xx = np.mgrid[:100, :100]
    for i, (cy, cx, r) in enumerate([(20, 20, 5), (50, 50, 10), (80, 80, 15)], start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    # discs of radius 5, 10, 15: the median is the middle one, diameter ~20 px
    assert median_diameter(labels) == pytest.approx(20.0, abs=0.5)
    assert np.isnan(median_diameter(np.zeros((5, 5), dtype=np.int32)))


def _two_worker_cluster(gpu_resources: dict[str, float]) -> SpecCluster:
    """Two worker processes, the first with ``gpu_resources``, on localhost."""
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "host": "127.0.0.1"}}
    workers = {
        "gpu": {"cls": Nanny, "options": {"nthreads": 2, "resources": gpu_resources}},
        "cpu": {"cls": Nanny, "options": {"nthreads": 2}},
    }
    return SpecCluster(workers=workers, scheduler=scheduler)


@pytest.mark.cluster
def test_model_is_loaded_once_per_worker(random_model):
    frames = np.stack([_blobs((256, 256), seed) for seed in range(4)])
    settings = InferenceSettings(model=random_model, tile_px=64, batch_size=4)
    maps = predict_maps_tiled(da.from_array(frames, chunks=(1, 128, 128)), settings=settings)
    n_tasks = len(next(v for k, v in maps.dask.layers.items() if k.startswith("infer-")))
    with _two_worker_cluster({}) as cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:
            result = client.compute(maps).result()
        loads = client.run(model_load_count)
        busy = {t["worker"] for t in stream.data if t["key"][0].startswith("infer-")}
    assert result.shape == (4, 4, 256, 256)
    assert n_tasks == 4 * 16
    assert len(busy) == 2  # both workers ran inference tasks ...
    assert sorted(loads.values()) == [1, 1]  # ... and each loaded the model exactly once


@pytest.mark.cluster
def test_inference_runs_only_on_the_gpu_worker(random_model):
    frames = np.stack([_blobs((192, 192), seed) for seed in range(3)])
    settings = InferenceSettings(model=random_model, tile_px=64, device="cpu")
    with _two_worker_cluster({"GPU": 1}) as cluster, Client(cluster) as client:
        gpu_worker = next(
            address
            for address, info in client.scheduler_info()["workers"].items()
            if info["resources"].get("GPU")
        )
        with get_task_stream(client) as stream:
            maps = predict_maps_tiled(da.from_array(frames, chunks=(1, 64, 64)), settings=settings)
            persisted = persist_on_gpu_workers(client, maps)
            # downstream CPU work on the maps is not restricted
            total = client.compute((persisted[:, 2] > 0.5).sum()).result()
        loads = client.run(model_load_count)
    inference = [t["worker"] for t in stream.data if t["key"][0].startswith("infer-")]
    assert len(inference) == 3 * 9
    assert set(inference) == {gpu_worker}
    assert loads[gpu_worker] == 1
    assert sum(loads.values()) == 1  # the worker without a GPU never loaded the model
    assert 0 <= total <= 3 * 192 * 192


@pytest.mark.cluster
def test_run_on_a_cluster_with_one_gpu_worker(small_plate, tmp_path):
    """``pipeline run``: inference (and the diameter estimate) only where ``GPU=1``."""
    import zarr

    from pipeline import run

    with _two_worker_cluster({"GPU": 1}) as cluster, Client(cluster) as client:
        gpu_worker = next(
            address
            for address, info in client.scheduler_info()["workers"].items()
            if info["resources"].get("GPU")
        )
        with get_task_stream(client) as stream:
            summary = run(small_plate, tmp_path / "out.zarr", scheduler=cluster.scheduler_address)
        loads = client.run(model_load_count)
    assert not summary.failed
    assert all(outcome.n_cells > 0 for outcome in summary.fields)
    inference = {t["worker"] for t in stream.data if t["key"][0].startswith("infer-")}
    assert inference == {gpu_worker}
    assert loads[gpu_worker] == 1
    assert sum(loads.values()) == 1
    assert zarr.open_group(tmp_path / "out.zarr").attrs["pipeline_run"]["status"] == "complete"
    if not torch.cuda.is_available():  # the worker declared with a GPU had none torch could use
        assert sorted(summary.devices.values()) == ["cpu", "cpu"]
        [warning] = [w for w in summary.device_warnings if w.startswith(f"worker {gpu_worker}: ")]
        assert warning.endswith("; the conv-net ran on its CPU")


def test_a_gpu_that_torch_cannot_use_is_named(monkeypatch):
    """A GPU node (an NVIDIA device file) whose torch has no CUDA: said, with the fix."""
    from pipeline.convnet import inference

    monkeypatch.setattr(inference.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inference.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    monkeypatch.setattr(inference.torch.version, "cuda", None)
    problem = inference.unusable_gpu()
    assert problem.startswith("/dev/nvidia0 is present but torch ")
    assert "CPU-only build" in problem
    monkeypatch.setattr(inference.glob, "glob", lambda pattern: [])
    assert inference.unusable_gpu() is None  # no GPU: nothing to say
    assert inference.device_name("auto") == inference.device_name("cpu") == "cpu"


def test_frames_per_inference_task_follow_the_device_and_do_not_change_results():
    """One frame per inference task on CPUs, 4 on GPU workers unless set; equal ids either way."""
    from skimage.draw import disk

    from pipeline.config import ComputeConfig
    from pipeline.orchestration.field import Placement
    from pipeline.segmentation.methods import instance_ids
    from pipeline.segmentation.parameters import SegmentationConfig

    rng = np.random.default_rng(3)
    planes = rng.normal(300, 20, (5, 96, 96))
    for plane in planes:  # four nuclei of ~16 px per frame, the shipped model's kind
        for centre in rng.uniform(16, 80, (4, 2)):
            plane[disk(tuple(centre), 8, shape=plane.shape)] += 2000
    frames = da.from_array(planes.astype(np.uint16), chunks=(1, 96, 96))
    segmentation = SegmentationConfig()

    def ids_and_inference_tasks(compute: ComputeConfig) -> tuple[np.ndarray, int]:
        ids = instance_ids(
            frames,
            segmentation,
            pixel_size=[1.0, 1.0],
            halo=(32, 32),
            diameter_px=16.0,
            compute=compute,
        )
        infer = [layer for name, layer in ids.dask.layers.items() if name.startswith("infer-")]
        with dask.config.set(scheduler="threads"):
            return ids.compute(), len(infer[0])

    cpu = ComputeConfig(device="cpu")
    on_gpu_workers = Placement(client=None, gpu_workers=True).execution(cpu)
    assert Placement(client=None).execution(cpu) == cpu
    assert on_gpu_workers.frames_per_block == 4
    set_by_user = ComputeConfig(device="cpu", frames_per_block=2)
    assert Placement(client=None, gpu_workers=True).execution(set_by_user) == set_by_user
    one_per_task, tasks_cpu = ids_and_inference_tasks(cpu)
    four_per_task, tasks_gpu = ids_and_inference_tasks(on_gpu_workers)
    assert (tasks_cpu, tasks_gpu) == (5, 2)  # one tile per frame: ceil(5 / 4) blocks of frames
    np.testing.assert_array_equal(one_per_task, four_per_task)
    assert one_per_task.max() > 0
