"""lia.py: phi exact on trained-shaped weights and wired as the generator's mapping, the perceptual loss on the conv4_3
tap of the real VGG16 weights with LIA's [0, 255] input, the encoder step (frozen g and phi bit-identical, the loss
term by term), refinement in y and z from the same start, path length against a closed form, smoke runs of every
stage (copied alone with common.py into an empty directory, the MLP arm, StyleGAN2), exact resume of each stage,
2-rank DDP, and eval.py rebuilding both arms' checkpoints. Subprocess runs go two at a time (one thread each)."""

import hashlib
import json
import math
import os
import shutil

import pytest
import torch
from conftest import Recording, ok, run_jobs, script_command

import common
import lia

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "--resolution 16 --width 8 --latent-dim 8 --n-mapping 2 --encoder-width 8 --batch-size 8 "
    "--eval-every 2 --save-every 2 --log-every 1 --eval-images 16 --ppl-samples 20 --refine-images 4 "
    "--refine-steps 3 --no-track"
).split()


def command(args, script=None, nproc=1):
    return script_command(script or os.path.join(ROOT, "lia.py"), args, nproc)


run_all = run_jobs


def state_digest(state_dict):
    h = hashlib.sha256()
    for k, t in sorted(state_dict.items()):
        h.update(k.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- phi
def trained_shaped(G, std=0.3):
    """Coupling output layers moved off their zero init, as training leaves them: phi is then far from a permutation."""
    torch.manual_seed(3)
    for step in G.mapping.steps:
        torch.nn.init.normal_(step.net[-1].weight, std=std)
        torch.nn.init.normal_(step.net[-1].bias, std=std)
    return G


@pytest.mark.parametrize("coupling", ["additive", "affine"])
@pytest.mark.parametrize("arch", ["dcgan", "stylegan2"])
def test_phi_is_exact_and_is_the_generators_mapping(arch, coupling):
    args = lia.parse_args(
        [
            "--stage",
            "gan",
            "--arch",
            arch,
            "--coupling",
            coupling,
            "--latent-dim",
            "32",
            "--resolution",
            "16",
            "--width",
            "8",
        ]
    )
    G = trained_shaped(common.build_from_spec(lia.gan_specs(args, 1)["G"]).eval(), std=0.15)
    assert len(G.mapping.steps) == 8  # the paper's 8 layers by default
    z = torch.randn(512, 32)
    y = lia.phi_inverse(G, z)
    assert (y - z.flip(1) if len(G.mapping.steps) % 2 else y - z).abs().max() > 0.5  # really non-linear
    # and in every coordinate: steps alternate halves, so no half of z passes through as itself (or reversed)
    assert (y - z).abs().amax(0).min() > 0.05 and (y - z.flip(1)).abs().amax(0).min() > 0.05
    assert (lia.phi(G, y) - z).abs().max() < 1e-5  # phi(phi^-1(z)) = z in float32
    assert (lia.phi_inverse(G, lia.phi(G, y)) - y).abs().max() < 1e-5
    with torch.no_grad():  # g(phi^-1(z)) is what G(z) computes: the mapping is phi^-1, synthesis takes y
        assert torch.equal(G(z[:4]), G.synthesis(y[:4]))


def test_defaults_are_the_papers():
    a = lia.parse_args([])
    assert (a.stage, a.mapping, a.coupling, a.n_mapping, a.loss) == ("all", "invertible", "additive", 8, "logistic")
    assert (a.beta1, a.beta2, a.vgg_input, a.r1) == (5e-5, 0.1, "0-255", 5.0)  # Eq. 12; R1 gamma 10 = 2 x 5
    assert a.mapping_lr_mul == 0.01 and a.arch == "dcgan" and a.dataset == "mnist"


def test_the_mlp_arm_keeps_an_mlp_and_has_no_inverse():
    args = lia.parse_args(["--stage", "gan", "--mapping", "mlp", "--latent-dim", "16", "--resolution", "16"])
    G = common.build_from_spec(lia.gan_specs(args, 1)["G"])
    assert isinstance(G.mapping, torch.nn.Sequential) and not hasattr(G.mapping, "inverse")
    assert sum(isinstance(m, torch.nn.Linear) for m in G.mapping) == 8


# ------------------------------------------------------------------------------------------------- losses
def test_perceptual_term_is_conv4_3_of_the_real_vgg16_on_0_255_input():
    import torchvision

    torch.manual_seed(0)
    x, x_rec = torch.rand(3, 1, 32, 32) * 2 - 1, torch.rand(3, 1, 32, 32) * 2 - 1
    loss_fn = lia.ReconstructionLoss("0-255")
    pixel, perceptual = loss_fn(x, x_rec)
    assert torch.allclose(pixel, (x - x_rec).square().mean((1, 2, 3)))
    # an independent VGG16: torchvision's own network with the converted ImageNet weights, cut after relu4_3 (index 23)
    vgg = torchvision.models.vgg16().features
    vgg.load_state_dict(common.load_checkpoint(os.path.join(common.WEIGHTS_DIR, "vgg16_features.pt")))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)

    def caffe_features(img, cut=23):  # [0, 255] minus the ImageNet mean, no std: the TF code's input
        with torch.no_grad():
            return vgg[:cut]((img.expand(-1, 3, -1, -1) + 1) * 127.5 - 255 * mean)

    expected = (caffe_features(x) - caffe_features(x_rec)).square().mean((1, 2, 3))
    assert torch.allclose(perceptual, expected, rtol=1e-4)
    wrong_tap = (caffe_features(x, 16) - caffe_features(x_rec, 16)).square().mean((1, 2, 3))  # relu3_3
    assert not torch.allclose(perceptual, wrong_tap, rtol=0.1)
    # the ImageNet-normalized input gives features ~58x smaller: a loss ~3300x smaller, which beta1 = 5e-5 would ignore
    _, normalized = lia.ReconstructionLoss("imagenet")(x, x_rec)
    assert 1000 < float(perceptual.mean() / normalized.mean()) < 10000


def tiny_models(mapping="invertible", arch="dcgan"):
    args = lia.parse_args(
        [
            "--stage",
            "encoder",
            "--gan",
            "x",
            "--mapping",
            mapping,
            "--arch",
            arch,
            "--latent-dim",
            "8",
            "--n-mapping",
            "2",
            "--resolution",
            "16",
            "--width",
            "8",
            "--encoder-width",
            "8",
        ]
    )
    specs = lia.gan_specs(args, 1)
    torch.manual_seed(0)
    G = common.build_from_spec(specs["G"])
    if mapping == "invertible":
        trained_shaped(G, 0.2)
    G = G.eval().requires_grad_(False)
    D = common.build_from_spec(specs["D"])
    E = common.ResNetEncoder(16, 1, 8, width=8)
    return args, G, D, E


def test_encoder_step_leaves_g_and_phi_bit_identical_and_trains_f_and_c():
    args, G, D, E = tiny_models()
    g_before, d_before, e_before = (state_digest(m.state_dict()) for m in (G, D, E))
    opt_e, opt_d = torch.optim.Adam(E.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    for _ in range(2):
        lia.encoder_step(G, E, D, opt_e, opt_d, x, lia.ReconstructionLoss(), args, r1_weight=5.0)
    assert state_digest(G.state_dict()) == g_before  # weights, phi and BatchNorm statistics alike
    assert state_digest(D.state_dict()) != d_before and state_digest(E.state_dict()) != e_before


@pytest.mark.parametrize("mapping", ["invertible", "mlp"])
def test_encoder_loss_term_by_term(mapping):
    """Eq. 12 as the code has it: pixel MSE + beta1 * conv4_3 MSE + beta2 * softplus(-c(x~)), x~ = g(f(x)) -- g(y)
    for LIA (no phi on the way), g(MLP(z)) for the MLP arm; c sees the real batch and x~."""
    args, G, D, E = tiny_models(mapping)
    E.eval()  # BatchNorm on running statistics: E(x) is the same in the step and in the hand computation below
    D = Recording(D)
    args.beta1, args.beta2 = 5e-5, 0.1
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    loss_fn = lia.ReconstructionLoss()
    opt_e, opt_d = torch.optim.SGD(E.parameters(), 0.0), torch.optim.SGD(D.parameters(), 0.0)
    scalars = lia.encoder_step(G, E, D, opt_e, opt_d, x, loss_fn, args, r1_weight=0.0)
    with torch.no_grad():
        code = E(x)
        x_rec = G.synthesis(code) if mapping == "invertible" else G.synthesis(G.mapping(code))
        pixel, perceptual = loss_fn(x, x_rec)
        adv = torch.nn.functional.softplus(-D.net(x_rec)[0]).mean()
    assert scalars["losses/pixel"] == pytest.approx(float(pixel.mean()), rel=1e-5)
    assert scalars["losses/perceptual"] == pytest.approx(float(perceptual.mean()), rel=1e-4)
    assert scalars["losses/adv"] == pytest.approx(float(adv), rel=1e-5)
    total = float(pixel.mean() + 5e-5 * perceptual.mean() + 0.1 * adv)
    assert scalars["losses/total"] == pytest.approx(total, rel=1e-5)
    with torch.no_grad():  # c: softplus(c(x~)) + softplus(-c(x)), fake first -- a swap would change the value
        d_loss = (
            torch.nn.functional.softplus(D.net(x_rec)[0]).mean() + torch.nn.functional.softplus(-D.net(x)[0]).mean()
        )
    assert scalars["losses/D"] == pytest.approx(float(d_loss), rel=1e-5)
    assert torch.allclose(D.inputs[0], x_rec, atol=1e-6)  # adversarial term on x~
    assert torch.equal(D.inputs[1], x) and torch.allclose(D.inputs[2], x_rec, atol=1e-6)  # then c: real vs x~


def test_gan_step_term_by_term():
    """Stage 1's losses as the step computes them: D on softplus(c(g(z1))) + softplus(-c(x)) + R1, G on
    softplus(-c(g(z2))) with fresh z2 (the non-saturating logistic loss); R1 = E ||grad_x c(x)||^2 by autograd."""
    args = lia.parse_args(
        ["--stage", "gan", "--latent-dim", "8", "--n-mapping", "2", "--resolution", "16", "--width", "8"]
    )
    specs = lia.gan_specs(args, 1)
    torch.manual_seed(0)
    G, D = trained_shaped(common.build_from_spec(specs["G"])).eval(), Recording(common.build_from_spec(specs["D"]))
    opt_g, opt_d = torch.optim.SGD(G.parameters(), 0.0), torch.optim.SGD(D.parameters(), 0.0)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.manual_seed(11)
    scalars = lia.gan_step(G, D, opt_g, opt_d, x, args, r1_weight=5.0)
    torch.manual_seed(11)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    softplus = torch.nn.functional.softplus
    x_real = x.clone().requires_grad_(True)
    real_logit = D.net(x_real)[0]
    (grad,) = torch.autograd.grad(real_logit.sum(), x_real)
    with torch.no_grad():
        d_loss = softplus(D.net(G(z1))[0]).mean() + softplus(-real_logit).mean()
        g_loss = softplus(-D.net(G(z2))[0]).mean()
    assert scalars["losses/D"] == pytest.approx(float(d_loss), rel=1e-5)
    assert scalars["losses/G"] == pytest.approx(float(g_loss), rel=1e-5)
    assert scalars["losses/R1"] == pytest.approx(float(grad.square().flatten(1).sum(1).mean()), rel=1e-4)
    assert torch.equal(D.inputs[0], x)  # R1 on the real batch


# ------------------------------------------------------------------------------------------------- refinement
def test_refine_starts_y_and_z_from_the_same_reconstruction_and_optimizes_each_image_alone():
    args, G, _, E = tiny_models()
    E.eval()
    args.refine_steps, args.lr, args.betas, args.beta1 = 5, 0.05, [0.9, 0.999], 5e-5
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    loss_fn = lia.ReconstructionLoss()
    y0 = lia.initial_codes(G, E, x, "encoder", 0)
    py, qy, xy = lia.refine(G, x, y0, "y", loss_fn, args)
    pz, qz, xz = lia.refine(G, x, y0, "z", loss_fn, args)
    assert py.shape == (6, 3)  # the init, then 5 steps
    assert torch.allclose(py[0], pz[0], atol=1e-6) and torch.allclose(qy[0], qz[0], rtol=1e-4)  # one start
    assert not torch.allclose(py[-1], pz[-1])  # two parametrizations, two paths
    total_y, total_z = py + 5e-5 * qy, pz + 5e-5 * qz  # Eq. 13's loss falls for every image
    assert (total_y[-1] < total_y[0]).all() and (total_z[-1] < total_z[0]).all()
    args.beta1 = 0.0  # Eq. 13's perceptual term steers the path: without it, another path
    assert not torch.allclose(lia.refine(G, x, y0, "y", loss_fn, args)[0], py, rtol=1e-4)
    args.beta1 = 5e-5
    alone, _, _ = lia.refine(G, x[1:2], y0[1:2], "y", loss_fn, args)  # a batch is per-image optimization
    assert torch.allclose(alone[:, 0], py[:, 1], rtol=1e-4)
    # the three inits: f(x), the mean y (one code for all), phi^-1 of a random z
    mean = lia.initial_codes(G, E, x, "mean", 0)
    assert torch.equal(mean[0], mean[2])
    assert not torch.allclose(lia.initial_codes(G, E, x, "random", 0), y0)


# ------------------------------------------------------------------------------------------------- path length
class LinearGenerator(torch.nn.Module):
    """x = A y with y = phi^-1(z) = z^3: path lengths in y have a closed form."""

    def __init__(self, d=6):
        super().__init__()
        self.z_dim = d
        self.A = torch.randn(16, d, dtype=torch.float64)

    def mapping(self, z):
        return z**3  # non-linear: a lerp in y is not a lerp in z

    def synthesis(self, y):
        return (y.double() @ self.A.t()).view(-1, 1, 4, 4)

    def forward(self, z):
        return self.synthesis(self.mapping(z))


def test_path_length_matches_the_closed_form():
    torch.manual_seed(0)
    G = LinearGenerator()
    sq_l2 = lambda a, b: (a - b).square().flatten(1).sum(1)  # noqa: E731  (LPIPS stands in as squared L2)
    n, seed = 200, 5
    r = lia.path_length(G, sq_l2, "y", "full", n, seed, "cpu")
    # by hand: the same z1, z2 draws; a lerp in y moves x by A (y2 - y1) per unit t, so the length is ||A (y2-y1)||^2
    gen = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, n, 100):
        z1, z2 = torch.randn(100, 6, generator=gen), torch.randn(100, 6, generator=gen)
        torch.rand(100, 1, generator=gen)
        values.append(((z2**3 - z1**3).double() @ G.A.t()).square().sum(1))
    d = torch.cat(values)
    d = d[(d >= torch.quantile(d, 0.01)) & (d <= torch.quantile(d, 0.99))]
    assert r["mean"] == pytest.approx(float(d.mean()), rel=1e-3)
    # slerp in z: the path stays at radius sqrt(d), and the endpoints are the directions of z1 and z2
    a, b = torch.randn(5, 6), torch.randn(5, 6)
    for t in (0.0, 0.3, 1.0):
        p = lia.slerp_directions(a, b, torch.full((5, 1), t))
        assert torch.allclose(p.norm(dim=1), torch.full((5,), math.sqrt(6)), atol=1e-5)
    assert torch.allclose(
        lia.slerp_directions(a, b, torch.zeros(5, 1)), a / a.norm(dim=1, keepdim=True) * math.sqrt(6), atol=1e-5
    )
    assert lia.path_length(G, sq_l2, "z", "end", 50, seed, "cpu")["mean"] > 0
    # 'end' sampling is StyleGAN's t = 0: with x = y^2 the length is ||2 y1 (y2 - y1)||^2 there, not at t = 1
    G.synthesis = lambda y: y.double().square().view(-1, 1, 2, 3)
    r = lia.path_length(G, sq_l2, "y", "end", 100, seed, "cpu")
    gen = torch.Generator().manual_seed(seed)
    y1, y2 = torch.randn(100, 6, generator=gen) ** 3, torch.randn(100, 6, generator=gen) ** 3
    d = (2 * y1 * (y2 - y1)).double().square().sum(1)
    d = d[(d >= torch.quantile(d, 0.01)) & (d <= torch.quantile(d, 0.99))]
    assert r["mean"] == pytest.approx(float(d.mean()), rel=1e-2)


# ------------------------------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """--stage all from a copy of the two files in an empty directory; the MLP arm; StyleGAN2; a gan and an encoder
    stage stopped at half budget then resumed; 2-rank DDP of every stage."""
    d = tmp_path_factory.mktemp("lia")
    copy = d / "copy"
    copy.mkdir()
    for f in ("lia.py", "common.py"):
        shutil.copy(os.path.join(ROOT, f), copy / f)
    gan, enc = str(copy / "runs/t__gan/checkpoint.pt"), str(copy / "runs/t__encoder/checkpoint.pt")
    # one queue, two at a time; a job that reads another's checkpoint waits for it (``after``); the DDP jobs last,
    # each alone on the two cores
    results = run_all(
        {
            "all": (command([*TINY, "--images", "32", "--run-name", "t"], str(copy / "lia.py")), copy),
            "mlp": (command([*TINY, "--images", "16", "--mapping", "mlp", "--run-name", "mlp"]), d),
            "sg2": (command([*TINY, "--images", "16", "--arch", "stylegan2", "--run-name", "sg2"]), d),
            "gan_part": (command([*TINY, "--stage", "gan", "--images", "16", "--run-name", "gan_part"]), d),
            "gan_resumed": (
                command([*TINY, "--stage", "gan", "--images", "32", "--resume", "runs/gan_part/checkpoint.pt"]),
                d,
                "gan_part",
            ),
            "enc_part": (
                command([*TINY, "--stage", "encoder", "--gan", gan, "--images", "16", "--run-name", "enc_part"]),
                d,
                "all",
            ),
            "enc_resumed": (
                command([*TINY, "--stage", "encoder", "--images", "32", "--resume", "runs/enc_part/checkpoint.pt"]),
                d,
                "enc_part",
            ),
        }
    )
    results.update(
        run_all(
            {
                "all_ddp": (command([*TINY, "--images", "32", "--refine-steps", "1", "--run-name", "ddp"], nproc=2), d),
                "refine_ddp": (
                    command([*TINY, "--stage", "refine", "--ckpt", enc, "--run-name", "refine_ddp"], nproc=2),
                    d,
                ),
            },
            jobs_at_once=1,
        )
    )
    return d, copy, results


def test_all_stages_copied_alone_write_their_outputs(runs):
    _, copy, results = runs
    out = ok(results["all"])["stdout"]
    assert "stage gan" in out and "stage encoder" in out and "stage refine" in out
    expected = {
        "t__gan": ["checkpoint.pt", "metrics.jsonl", "samples.png", "ppl.json", "summary.json"],
        "t__encoder": ["checkpoint.pt", "metrics.jsonl", "reconstructions.png", "interpolation_y.png", "summary.json"],
        "t__refine": ["checkpoint.pt", "refine.json", "fig11_inits.png", "fig10_y_vs_z.png", "refine_grid.png"],
    }
    for run, files in expected.items():
        for f in files:
            assert (copy / "runs" / run / f).is_file(), f"{run}/{f}"
    # how far phi moved from its initialisation is logged, and it did move (docs/lia.md reads these)
    gan_rows = [json.loads(line) for line in (copy / "runs/t__gan/metrics.jsonl").read_text().splitlines()]
    moved = [r for r in gan_rows if "eval/phi_weight_change" in r]
    assert moved and all(r["eval/phi_weight_change"] > 0 and r["eval/phi_output_change"] > 0 for r in moved)
    ppl = json.loads((copy / "runs/t__gan/ppl.json").read_text())
    assert all(ppl[k]["mean"] > 0 for k in ("z_full", "z_end", "y_full", "y_end"))
    # the scripts feed VGG16 LIA's [0, 255] input: conv4_3 losses in the thousands (ImageNet input: a few units)
    rows = [json.loads(line) for line in (copy / "runs/t__encoder/metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["losses/perceptual"] > 100 for row in rows)
    refine = json.loads((copy / "runs/t__refine/refine.json").read_text())
    assert all(r["perceptual"]["mean"][0] > 100 for r in refine["results"].values())
    assert set(refine["results"]) == {f"{s}/{i}" for s in ("y", "z") for i in ("encoder", "mean", "random")}
    for r in refine["results"].values():
        assert len(r["pixel"]["mean"]) == 4  # init + 3 steps
    # stage 2 left the generator (phi included) exactly as stage 1 wrote it: G_ema, weights and BatchNorm statistics
    gan = common.load_checkpoint(str(copy / "runs/t__gan/checkpoint.pt"))
    enc = common.load_checkpoint(str(copy / "runs/t__encoder/checkpoint.pt"))
    assert state_digest(enc["state_dicts"]["G"]) == state_digest(gan["state_dicts"]["G_ema"])
    assert any(k.startswith("mapping.steps") for k in enc["state_dicts"]["G"])
    assert enc["inversion"]["encoder_space"] == "w"


def test_mlp_arm_encodes_to_z_and_skips_refinement(runs):
    d, _, results = runs
    out = ok(results["mlp"])["stdout"]
    assert "f: x -> z" in out and "no refine stage" in out
    ckpt = common.load_checkpoint(str(d / "runs/mlp__encoder/checkpoint.pt"))
    assert ckpt["inversion"]["encoder_space"] == "z"


def test_stylegan2_writes_style_mixing(runs):
    d, _, results = runs
    ok(results["sg2"])
    for group in ("coarse", "middle", "fine"):
        assert (d / f"runs/sg2__encoder/style_mixing_{group}.png").is_file()


@pytest.mark.parametrize("stage", ["gan", "encoder"])
def test_resume_is_exact(runs, stage):
    d, copy, results = runs
    ok(results[f"{stage[:3]}_part"]), ok(results[f"{stage[:3]}_resumed"])
    full = common.load_checkpoint(str(copy / f"runs/t__{stage}/checkpoint.pt"))
    resumed = common.load_checkpoint(str(d / f"runs/{stage[:3]}_part/checkpoint.pt"))
    assert full["step"] == resumed["step"] == 4
    for net, state in full["state_dicts"].items():
        for k, t in state.items():
            assert torch.equal(t, resumed["state_dicts"][net][k]), f"{net}.{k}"
    for name, opt in full["optimizers"].items():
        for i, s in opt["state"].items():
            assert torch.equal(s["exp_avg_sq"], resumed["optimizers"][name]["state"][i]["exp_avg_sq"])
    if stage == "gan":  # the resumed run measures phi's movement from the same initialisation
        last = []
        for root in (copy / "runs/t__gan", d / "runs/gan_part"):
            rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
            last.append([r for r in rows if "eval/phi_weight_change" in r][-1])
        assert last[0]["step"] == last[1]["step"] and last[0]["eval/phi_weight_change"] > 0
        assert last[0]["eval/phi_weight_change"] == last[1]["eval/phi_weight_change"]


def test_refine_resume_skips_finished_runs_and_matches(runs, tmp_path):
    _, copy, _ = runs
    full = common.load_checkpoint(str(copy / "runs/t__refine/checkpoint.pt"))
    partial = dict(
        full,
        results={k: v for k, v in list(full["results"].items())[:2]},
        finals={k: v for k, v in list(full["finals"].items())[:2]},
    )
    (tmp_path / "runs/part").mkdir(parents=True)
    common.save_checkpoint(partial, str(tmp_path / "runs/part/checkpoint.pt"))
    r = ok(
        run_all({"r": (command([*TINY, "--stage", "refine", "--resume", "runs/part/checkpoint.pt"]), tmp_path)})["r"]
    )
    assert "6 runs, 2 already done" in r["stdout"]
    resumed = json.loads((tmp_path / "runs/part/refine.json").read_text())["results"]
    for key, value in full["results"].items():
        assert resumed[key]["pixel"]["mean"] == pytest.approx(value["pixel"]["mean"], rel=1e-6), key


def test_ddp_every_stage(runs):
    d, copy, results = runs
    out = ok(results["all_ddp"])["stdout"]  # the three stages under one torchrun
    assert "parameters and BatchNorm statistics identical on 2 ranks" in out
    assert "encoder and discriminator identical on 2 ranks" in out and "stage refine" in out
    for name in ("ddp__gan", "ddp__encoder"):
        ckpt = common.load_checkpoint(str(d / f"runs/{name}/checkpoint.pt"))
        assert len(ckpt["rng"]) == 2 and ckpt["step"] == 4
    ok(results["refine_ddp"])  # each rank refines half the images; the gathered curves are one process's
    single = json.loads((copy / "runs/t__refine/refine.json").read_text())["results"]
    ddp = json.loads((d / "runs/refine_ddp/refine.json").read_text())["results"]
    for key in single:
        for loss in ("pixel", "perceptual"):
            assert ddp[key][loss]["mean"] == pytest.approx(single[key][loss]["mean"], rel=1e-4), key


def test_eval_rebuilds_both_arms(runs):

    d, copy, _ = runs
    inv = common.load_inverter(str(copy / "runs/t__encoder/checkpoint.pt"), torch.device("cpu"))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    y = inv.encode(x)
    assert torch.equal(inv.decode(y), inv.G.synthesis(y).clamp(-1, 1))  # f(x) is y: no phi on the way to the image
    assert torch.allclose(inv.to_space("z", y), inv.G.mapping.inverse(y))  # z = phi(y)
    assert torch.allclose(inv.G.mapping(inv.to_space("z", y)), y, atol=1e-5)
    assert "w" in inv.spaces and "z" in inv.spaces
    mlp = common.load_inverter(str(d / "runs/mlp__encoder/checkpoint.pt"), torch.device("cpu"))
    z = mlp.encode(x)
    assert torch.equal(mlp.decode(z), mlp.G(z).clamp(-1, 1))


def test_wrong_stage_checkpoints_fail_in_one_line(runs, tmp_path):
    _, copy, _ = runs
    gan, enc = str(copy / "runs/t__gan/checkpoint.pt"), str(copy / "runs/t__encoder/checkpoint.pt")
    cases = {
        "enc_on_enc": ([*TINY, "--stage", "encoder", "--gan", enc], "is a 'encoder'-stage lia checkpoint, not a 'gan'"),
        "refine_on_gan": (
            [*TINY, "--stage", "refine", "--ckpt", gan],
            "is a 'gan'-stage lia checkpoint, not a 'encoder'",
        ),
        "resume_stage": ([*TINY, "--stage", "gan", "--resume", enc], "resume it with --stage encoder"),
    }
    results = run_all({k: (command(a), tmp_path) for k, (a, _) in cases.items()})
    for name, (_, message) in cases.items():
        r = results[name]
        assert r["returncode"] != 0 and message in r["stderr"], (name, r["stderr"][-800:])
        assert r["stderr"].strip().count("\n") == 0, r["stderr"]
    assert not (tmp_path / "runs").exists()
