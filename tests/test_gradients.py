"""Where every loss term's gradient goes, for every method. A test of a loss's value does not see a detach() in the
wrong place, so here each term is back-propagated alone on tiny networks and the parameter groups it reaches are
asserted exactly (M, G's synthesis, D's trunk, D's shared dense layer, D's latent head, D's adversarial head, the
encoder); each step's whole gradient is compared with one recomputed from the paper's equation, with weights that are
neither the defaults nor 1; and each training loop is stopped at its first step to check what it freezes, which
checkpoint each network starts from and what each optimizer holds."""

import copy

import pytest
import torch
import torch.nn.functional as F

import common
import dlsgan
import invgan
import lia
import regressor_inversion as ri


# ------------------------------------------------------------------------------------------------- helpers
def gradients(loss, params):
    """d loss / d p for every p (zero where the loss does not depend on p, or p is frozen); the graph is kept."""
    live = [p for p in params if p.requires_grad]
    got = dict(zip(map(id, live), torch.autograd.grad(loss, live, allow_unused=True, retain_graph=True)))
    return [got[id(p)] if got.get(id(p)) is not None else torch.zeros_like(p) for p in params]


def reached(loss, groups):
    """The names of the groups (name -> module) in which some parameter gets a non-zero gradient from ``loss``."""
    return {name for name, m in groups.items() if any(g.abs().sum() > 0 for g in gradients(loss, list(m.parameters())))}


def same_gradients(loss, reference, modules):
    """The two losses give every parameter of ``modules`` the same gradient (and the gradient is not all zero)."""
    params = [p for m in modules for p in m.parameters()]
    close(gradients(loss, params), gradients(reference, params))


def close(got, want):
    """Equal up to float32 rounding, relative to the largest gradient: at init some paths carry gradients a thousand
    times smaller than others (D_w(G(w~)) through w~ in the cycle term), and a fixed atol would hide them."""
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.zeros_like(w) if g is None else g, w, rtol=1e-4, atol=1e-6 * scale)


def grads_after_step(modules):
    """Each parameter's .grad as the step left it (None where none arrived)."""
    return [p.grad for m in modules for p in m.parameters()]


def assert_grads_equal(left, modules, reference):
    close(left, gradients(reference, [p for m in modules for p in m.parameters()]))


def no_grads(modules):
    return all(p.grad is None or not p.grad.any() for m in modules for p in m.parameters())


def zero_adversarial(monkeypatch):
    """Every adversarial loss replaced by zero (times the logits, so the graph is kept): the other terms alone."""
    monkeypatch.setattr(common, "d_adv_loss", lambda kind, real, fake: 0 * (real.sum() + fake.sum()))
    monkeypatch.setattr(common, "g_adv_loss", lambda kind, fake: 0 * fake.sum())


def d_groups(D):
    return {"D trunk": D.trunk, "D dense": D.heads.dense, "D latent head": D.heads.latent, "D adv head": D.heads.adv}


D_ADV = {"D trunk", "D dense", "D adv head"}  # the logit's path
D_LATENT = {"D trunk", "D dense", "D latent head"}  # the encoder's path


def lr0(module):
    return torch.optim.SGD(module.parameters(), lr=0.0)  # a step that leaves .grad readable and the weights as they are


# ------------------------------------------------------------------------------------------------- InvGAN, Eq. 3
def invgan_nets(*flags):
    args = invgan.parse_args(
        "--resolution 16 --width 8 --latent-dim 8 --w-dim 8 --batch-size 8 --no-track --lambda-latent 0.5 "
        "--lambda-fm 20 --lambda-cycle 30 --lambda-mmd 4".split()
        + list(flags)
    )
    specs = invgan.model_specs(args, 1)
    torch.manual_seed(0)
    # G's BatchNorm on running statistics: in training mode the batch statistics join M(z)'s images and w_R's, so
    # every term on G's batch also reaches M through them; eval mode leaves each term's own path to be pinned
    G, D = common.build_from_spec(specs["G"]).eval(), common.build_from_spec(specs["D"])
    return args, G, D


def invgan_groups(G, D):
    return {"M": G.mapping, "synthesis": G.synthesis, **d_groups(D)}


def invgan_eq3(G, D, x, z, fm_form="paired", min_d_on_fakes=False):
    """Eq. 3's G-side terms from the paper: G's batch is [M(z); w_R], w_R = D_w(x_real) the one live pass through D;
    D judges and encodes G's images as a fixed function (a frozen copy); f(x_real) is a fixed target. With
    ``min_d_on_fakes`` D's codes and features of G's images are live too (its logit still is not)."""
    n_real = len(x) // 2
    D_judge = copy.deepcopy(D).requires_grad_(False)
    D_fixed = D if min_d_on_fakes else D_judge
    w = G.mapping(z)
    w_r = D(x[:n_real])[1]
    f_real = D.features(x[:n_real]).detach()
    w_all = torch.cat([w, w_r])
    x_gen = G.synthesis(w_all)
    logit, w_tilde = D_judge(x_gen)[0], D_fixed(x_gen)[1]
    fm_diff = f_real - D_fixed.features(x_gen[len(z) :])
    return {
        "adv": F.softplus(-logit).mean(),
        "latent": (w_all - w_tilde).square().mean(),
        "cycle": (w_tilde - D_fixed(G.synthesis(w_tilde))[1]).square().mean(),
        "fm": (fm_diff.mean(0) if fm_form == "eq2" else fm_diff).square().mean(),
        "mmd": common.mmd_rbf(w, w_r),
    }


INVGAN_REACHES = {  # with --grad-through-wr; without it, none of D's groups
    "adv": {"M", "synthesis"} | D_LATENT,
    "latent": {"M", "synthesis"} | D_LATENT,
    "cycle": {"M", "synthesis"} | D_LATENT,
    "fm": {"synthesis"} | D_LATENT,  # f(G(w_R)) only: M's codes are not in it
    "mmd": {"M"} | D_LATENT,  # codes only: no image is made
}


def invgan_batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 1, 16, 16, generator=g) * 2 - 1, torch.randn(4, 8, generator=g)


@pytest.mark.parametrize("through_wr", [True, False])
@pytest.mark.parametrize("term", sorted(INVGAN_REACHES))
def test_invgan_each_g_term_reaches_exactly_its_groups(term, through_wr):
    args, G, D = invgan_nets("--grad-through-wr" if through_wr else "--no-grad-through-wr")
    x, z = invgan_batch()
    _, terms = invgan.g_losses(G, D, x, args, z)
    expected = INVGAN_REACHES[term] if through_wr else INVGAN_REACHES[term] - D_LATENT
    assert reached(terms[term], invgan_groups(G, D)) == expected
    reference = invgan_eq3(G, D, x, z)[term]
    if not through_wr:
        reference = invgan_eq3(G, copy.deepcopy(D), x, z)[term]  # w_R a constant: D's own copy gets the gradient
    same_gradients(terms[term], reference, [G] + ([D] if through_wr else []))


@pytest.mark.parametrize("term", ["latent", "cycle", "fm", "mmd"])
def test_invgan_literal_forms_of_eq2_and_eq3(term):
    """--fm-form eq2 (the batch mean inside the norm) and --min-d-on-fakes (D minimizes the G-step terms through its
    codes and features of G's images as well): each term's whole gradient against the literal equation."""
    args, G, D = invgan_nets("--fm-form", "eq2", "--min-d-on-fakes")
    x, z = invgan_batch()
    _, terms = invgan.g_losses(G, D, x, args, z)
    assert reached(terms[term], invgan_groups(G, D)) == INVGAN_REACHES[term]
    same_gradients(terms[term], invgan_eq3(G, D, x, z, "eq2", min_d_on_fakes=True)[term], [G, D])
    if term in ("latent", "cycle", "fm"):  # and the literal form is another gradient for D than the default's
        default = invgan_eq3(G, D, x, z, "eq2")[term]
        d_params = list(D.parameters())
        assert any(
            (a - b).abs().max() > 1e-9 for a, b in zip(gradients(terms[term], d_params), gradients(default, d_params))
        )
    with pytest.raises(SystemExit, match="--grad-through-wr"):
        invgan_nets("--min-d-on-fakes", "--no-grad-through-wr")


@pytest.mark.parametrize("wr_adv_grad", [False, True])
def test_invgan_g_step_sends_every_weighted_term_and_not_the_adversarial_one_into_D(wr_adv_grad):
    args, G, D = invgan_nets("--wr-adv-grad" if wr_adv_grad else "--no-wr-adv-grad")
    x, z = invgan_batch()
    invgan.g_step(G, D, lr0(G), lr0(D), x, args, z=z)
    g_grads, d_grads = grads_after_step([G]), grads_after_step([D])
    t = invgan_eq3(G, D, x, z)
    rest = 0.5 * t["latent"] + 20 * t["fm"] + 30 * t["cycle"] + 4 * t["mmd"]
    assert_grads_equal(g_grads, [G], t["adv"] + rest)
    assert_grads_equal(d_grads, [D], rest + (t["adv"] if wr_adv_grad else 0))
    assert all(p.grad is None for p in D.heads.adv.parameters())
    assert all(p.requires_grad for p in D.parameters())  # D is whole again for its own step


@pytest.mark.parametrize("r1", [0.0, 3.0])
def test_invgan_d_step_is_adversarial_plus_lambda_latent_on_fixed_targets(r1):
    args, G, D = invgan_nets("--lambda-latent", "8")
    x, z = invgan_batch()
    invgan.d_step(G, D, lr0(D), x, args, r1_weight=r1, z=z)
    d_grads = grads_after_step([D])
    assert no_grads([G])
    with torch.no_grad():  # the codes and G's images are targets and inputs: no gradient through them
        w_all = torch.cat([G.mapping(z), D(x[:4])[1]])
        x_gen = G.synthesis(w_all)
    x_r = x.clone().requires_grad_(True)
    real_logit = D(x_r)[0]
    gen_logit, w_tilde = D(x_gen)
    (dx,) = torch.autograd.grad(real_logit.sum(), x_r, create_graph=True)
    adv = F.softplus(gen_logit).mean() + F.softplus(-real_logit).mean()
    assert reached(adv, d_groups(D)) == D_ADV and reached((w_all - w_tilde).square().mean(), d_groups(D)) == D_LATENT
    reference = adv + 8 * (w_all - w_tilde).square().mean() + r1 * dx.square().sum((1, 2, 3)).mean()
    assert_grads_equal(d_grads, [D], reference)


# ------------------------------------------------------------------------------------------------- DLSGAN
def dlsgan_nets(*flags):
    args = dlsgan.parse_args(
        "--arch dcgan --resolution 16 --width 8 --latent-dim 16 --batch-size 8 --v-window 32 --no-track "
        "--lambda-enc 3".split()
        + list(flags)
    )
    specs = dlsgan.model_specs(args, 1)
    torch.manual_seed(0)
    return args, common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])


S = torch.linspace(0.2, 1.8, 16)


def dlsgan_d_step(monkeypatch, zero_adv=False, lambda_enc=3.0, r1=0.0):
    args, G, D = dlsgan_nets("--lambda-enc", str(lambda_enc))
    if zero_adv:
        zero_adversarial(monkeypatch)
    v = dlsgan.PredictedVariance(16, "window", window_batches=4)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    torch.manual_seed(5)
    dlsgan.d_step(G, D, lr0(D), v, x, S, **dlsgan.step_kwargs(args), r1_weight=r1)
    return G, D, x


@pytest.mark.parametrize(
    "term, setting, groups",
    [("adversarial", {"lambda_enc": 0.0}, D_ADV), ("L_enc", {"zero_adv": True}, D_LATENT)]
    + [("R1", {"zero_adv": True, "lambda_enc": 0.0, "r1": 2.0}, D_ADV)],
)
def test_dlsgan_d_step_each_term_reaches_exactly_its_groups(monkeypatch, term, setting, groups):
    G, D, _ = dlsgan_d_step(monkeypatch, **setting)
    assert {n for n, m in d_groups(D).items() if not no_grads([m])} == groups
    assert no_grads([G])  # D's step never trains G


def test_dlsgan_d_step_gradient_is_adversarial_plus_lambda_enc_L_enc_with_s2_plus_r1(monkeypatch):
    G, D, x = dlsgan_d_step(monkeypatch, lambda_enc=3.0, r1=2.0)
    d_grads = grads_after_step([D])
    torch.manual_seed(5)
    z = torch.randn(8, 16)
    with torch.no_grad():
        x_fake = G(z * S)
    x_r = x.clone().requires_grad_(True)
    real_logit = D(x_r)[0]
    fake_logit, z_hat = D(x_fake)
    (dx,) = torch.autograd.grad(real_logit.sum(), x_r, create_graph=True)
    reference = (
        F.softplus(-real_logit).mean()
        + F.softplus(fake_logit).mean()
        + 3.0 * ((z - z_hat).square() * S.square()).mean()
        + 2.0 * dx.square().sum((1, 2, 3)).mean()
    )
    assert_grads_equal(d_grads, [D], reference)


@pytest.mark.parametrize("dg", [False, True])
def test_dlsgan_g_step_trains_G_on_adversarial_plus_L_enc_only_with_dg_and_never_D(monkeypatch, dg):
    args, G, D = dlsgan_nets(*(["--dg"] if dg else []))
    torch.manual_seed(3)
    dlsgan.g_step(G, D, lr0(G), S, 8, dg=args.dg, **dlsgan.step_kwargs(args))
    g_grads = grads_after_step([G])
    assert no_grads([D]) and all(p.requires_grad for p in D.parameters())
    torch.manual_seed(3)
    z = torch.randn(8, 16)
    D_fixed = copy.deepcopy(D).requires_grad_(False)
    logit, z_hat = D_fixed(G(z * S))
    l_enc = ((z - z_hat).square() * S.square()).mean()
    assert_grads_equal(g_grads, [G], F.softplus(-logit).mean() + (3.0 * l_enc if dg else 0))
    # L_enc alone: it reaches G with --dg, and nothing without
    args, G, D = dlsgan_nets(*(["--dg"] if dg else []))
    zero_adversarial(monkeypatch)
    dlsgan.g_step(G, D, lr0(G), S, 8, dg=args.dg, **dlsgan.step_kwargs(args))
    assert no_grads([G]) != dg and no_grads([D])


# ------------------------------------------------------------------------------------------------- LIA
def lia_nets(mapping="invertible"):
    args = lia.parse_args(
        "--stage encoder --gan x.pt --resolution 16 --width 8 --latent-dim 8 --n-mapping 2 --encoder-width 8 "
        f"--mapping {mapping} --beta1 3e-4 --beta2 0.3".split()
    )
    specs = lia.gan_specs(args, 1)
    torch.manual_seed(0)
    G, D = common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])
    if mapping == "invertible":
        lia.randomize_phi(G)
    E = common.ResNetEncoder(16, 1, 8, width=8)
    return args, G, D, E


def lia_d_groups(D):
    return {"D trunk": D.trunk, "D dense": D.heads.dense, "D adv head": D.heads.adv}


def test_lia_gan_step_trains_D_on_its_loss_and_R1_and_G_with_phi_on_the_adversarial_loss():
    args, G, D, _ = lia_nets()
    args.loss = "logistic"
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.manual_seed(11)
    lia.gan_step(G, D, lr0(G), lr0(D), x, args, r1_weight=2.5)
    g_grads, d_grads = grads_after_step([G]), grads_after_step([D])
    torch.manual_seed(11)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    x_r = x.clone().requires_grad_(True)
    real_logit = D(x_r)[0]
    (dx,) = torch.autograd.grad(real_logit.sum(), x_r, create_graph=True)
    with torch.no_grad():
        x_fake = G(z1)
    d_loss = F.softplus(D(x_fake)[0]).mean() + F.softplus(-real_logit).mean() + 2.5 * dx.square().sum((1, 2, 3)).mean()
    assert_grads_equal(d_grads, [D], d_loss)
    g_loss = F.softplus(-copy.deepcopy(D).requires_grad_(False)(G(z2))[0]).mean()
    assert reached(g_loss, {"phi": G.mapping, "synthesis": G.synthesis}) == {"phi", "synthesis"}
    assert_grads_equal(g_grads, [G], g_loss)


class OneTerm(torch.nn.Module):
    """LIA's reconstruction loss with one of (pixel, perceptual) zeroed, to back-propagate the other alone."""

    def __init__(self, loss_fn, keep):
        super().__init__()
        self.loss_fn, self.keep = loss_fn, keep

    def forward(self, x, x_rec, x_features=None):
        pixel, perceptual = self.loss_fn(x, x_rec, x_features)
        return pixel * (self.keep == "pixel"), perceptual * (self.keep == "perceptual")


@pytest.fixture(scope="module")
def reconstruction_loss():
    return lia.ReconstructionLoss()


@pytest.mark.parametrize("term", ["pixel", "perceptual", "adversarial"])
def test_lia_encoder_step_each_term_trains_f_only_and_c_learns_only_real_vs_reconstruction(term, reconstruction_loss):
    args, G, D, E = lia_nets()
    G.eval().requires_grad_(False)  # as train_encoder freezes it
    loss_fn = OneTerm(reconstruction_loss, term)
    args.beta2 = 0.3 if term == "adversarial" else 0.0
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    lia.encoder_step(G, E, D, lr0(E), lr0(D), x, loss_fn, args, r1_weight=1.5)
    assert not no_grads([E])
    e_grads, d_grads = grads_after_step([E]), grads_after_step([D])
    # c's gradient is its own loss on (x, x~ fixed) + R1 alone: nothing of f's step leaks into it
    with torch.no_grad():
        E_eval = copy.deepcopy(E)
        x_rec = G.synthesis(E_eval.train()(x))
    x_r = x.clone().requires_grad_(True)
    real_logit = D(x_r)[0]
    (dx,) = torch.autograd.grad(real_logit.sum(), x_r, create_graph=True)
    d_ref = F.softplus(D(x_rec)[0]).mean() + F.softplus(-real_logit).mean() + 1.5 * dx.square().sum((1, 2, 3)).mean()
    assert_grads_equal(d_grads, [D], d_ref)
    # f's gradient is that of its one term, through g(y) with no phi on the way (LIA's encoder space is y)
    E_ref = copy.deepcopy(E)
    x_rec = G.synthesis(E_ref(x))
    pixel, perceptual = reconstruction_loss(x, x_rec)
    D_fixed = copy.deepcopy(D).requires_grad_(False)
    e_ref = {
        "pixel": pixel.mean(),
        "perceptual": args.beta1 * perceptual.mean(),
        "adversarial": 0.3 * F.softplus(-D_fixed(x_rec)[0]).mean(),
    }[term]
    close(e_grads, gradients(e_ref, list(E_ref.parameters())))


def test_lia_encoder_loss_weights_beta1_and_beta2(reconstruction_loss):
    args, G, D, E = lia_nets()
    G.eval().requires_grad_(False)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    E_ref = copy.deepcopy(E)
    lia.encoder_step(G, E, D, lr0(E), lr0(D), x, reconstruction_loss, args, r1_weight=0.0)
    x_rec = G.synthesis(E_ref(x))
    pixel, perceptual = reconstruction_loss(x, x_rec)
    # D before its own step: lr 0 left it as it was
    reference = pixel.mean() + 3e-4 * perceptual.mean() + 0.3 * F.softplus(-copy.deepcopy(D)(x_rec)[0]).mean()
    close([p.grad for p in E.parameters()], gradients(reference, list(E_ref.parameters())))


def test_lia_refinement_moves_only_the_codes():
    args, G, _, E = lia_nets()
    G.eval().requires_grad_(False)
    args.refine_steps, args.lr, args.betas = 2, 0.05, [0.9, 0.999]
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    before = copy.deepcopy(G.state_dict())
    for space in ("y", "z"):
        lia.refine(G, x, E.eval()(x).detach(), space, lia.ReconstructionLoss(), args)
    assert all(torch.equal(t, G.state_dict()[k]) for k, t in before.items()) and no_grads([G])


# ------------------------------------------------------------------------------------------------- the regressor, Eq. 2
def regressor_nets(*flags):
    args = ri.parse_args(
        "--generator x.pt --encoder-width 4 --batch-size 8 --no-track --lambda-pix 0.7 --lambda-p 0.3 "
        "--lambda-z 2.5".split()
        + list(flags)
    )
    args.resolution, args.latent_dist = 16, "normal"  # what resolve_generator sets from the generator
    torch.manual_seed(0)
    G = common.DCGANGenerator(8, 16, 1, width=8).eval().requires_grad_(False)
    gen = {"spec": common.model_spec(common.DCGANGenerator, z_dim=8, resolution=16, img_channels=1, width=8)}
    E = common.build_from_spec(ri.regressor_spec(args, {**gen, "z_dim": 8}, 1))
    return args, G, E


def l1_perceptual(a, b):  # an L_p with a gradient everywhere; the script must add lambda_p times it
    return (a - b).abs().mean((1, 2, 3))


@pytest.mark.parametrize("term", ["pixel", "perceptual", "latent"])
def test_regressor_each_term_of_eq2_trains_E_only(term):
    weights = {"pixel": "--lambda-pix", "perceptual": "--lambda-p", "latent": "--lambda-z"}
    off = [a for k, flag in weights.items() if k != term for a in (flag, "0")]
    args, G, E = regressor_nets(*off)
    torch.manual_seed(7)
    ri.regressor_step(G, E, lr0(E), S[:8], 8, l1_perceptual, args, torch.device("cpu"))
    assert not no_grads([E]) and all(p.grad is None for p in G.parameters())


def test_regressor_gradient_is_eq2_with_its_weights():
    args, G, E = regressor_nets()
    E_ref = copy.deepcopy(E)
    s = S[:8]
    torch.manual_seed(7)
    ri.regressor_step(G, E, lr0(E), s, 8, l1_perceptual, args, torch.device("cpu"))
    torch.manual_seed(7)
    z = torch.randn(8, 8)
    mask = common.random_masks(8, 16)[0]
    x = G(z * s)
    z_hat = E_ref(torch.cat([x * mask, mask], 1))
    x_hat = G(z_hat * s)
    reference = (
        0.7 * (x - x_hat).square().mean() + 0.3 * l1_perceptual(x_hat, x).mean() + 2.5 * (z_hat - z).square().mean()
    )
    close([p.grad for p in E.parameters()], gradients(reference, list(E_ref.parameters())))


def test_regressor_gan_step_trains_G_on_the_non_saturating_loss_against_a_fixed_D():
    args = ri.parse_args("--stage gan --resolution 16 --width 8 --d-width 8 --latent-dim 8 --no-track".split())
    args.dataset = "mnist"
    specs = ri.gan_specs(args, 1)
    torch.manual_seed(0)
    G, D = common.build_from_spec(specs["G"]), common.build_from_spec(specs["D"])
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D).requires_grad_(False)
    x_real = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.manual_seed(1)
    ri.gan_step(G, D, lr0(G), lr0(D), x_real, args, torch.device("cpu"))
    torch.manual_seed(1)
    reference = F.softplus(-D_ref(G_ref(torch.randn(4, 8)))[0]).mean()
    close([p.grad for p in G.parameters()], gradients(reference, list(G_ref.parameters())))


# ------------------------------------------------------------------------------------------------- LIA's wiring
def test_lia_refinement_inits_are_the_papers():
    """Fig. 11's three starts: f(x) itself; the mean of phi^-1(z) over 10,000 prior samples (not phi^-1 of the mean
    z); a random y = phi^-1(z) (not a raw z). With phi non-linear each wrong reading gives another code."""
    _, G, _, E = lia_nets()
    G.eval(), E.eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(lia.initial_codes(G, E, x, "encoder", 5), E(x))
        z = common.sample_z(10_000, 8, "normal", "cpu", torch.Generator().manual_seed(5))
        mean = lia.initial_codes(G, E, x, "mean", 5)
        torch.testing.assert_close(mean, G.mapping(z).mean(0, keepdim=True).expand(3, -1), rtol=1e-5, atol=1e-5)
        assert (mean[0] - G.mapping(z.mean(0, keepdim=True))[0]).abs().max() > 1e-2
        z = common.sample_z(3, 8, "normal", "cpu", torch.Generator().manual_seed(6))
        random = lia.initial_codes(G, E, x, "random", 5)
        assert torch.equal(random, G.mapping(z)) and (random - z).abs().max() > 1e-2


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_lia_phi_is_really_non_linear(coupling):
    """phi^-1(a + b) - phi^-1(a) - phi^-1(b) + phi^-1(0) vanishes for an affine map; a coupling network whose
    non-linearity is gone would pass an 'y != z' check but not this one."""
    G = common.DCGANMappingGenerator(8, 8, 16, 1, 8, n_mapping=2, mapping="invertible", coupling=coupling)
    torch.manual_seed(1)
    lia.randomize_phi(G)
    a, b = torch.randn(64, 8) * 2, torch.randn(64, 8) * 2
    with torch.no_grad():
        m = G.mapping
        assert (m(a + b) - m(a) - m(b) + m(torch.zeros_like(a))).abs().max() > 1e-2


class Stop(Exception):
    pass


def stop_at_first_call(monkeypatch, module, name):
    """``module.name`` records its arguments at its first call and stops the run there."""
    seen = {}

    def spy(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise Stop

    monkeypatch.setattr(module, name, spy)
    return seen


def params_of(optimizer):
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


def is_frozen(net):
    return not any(p.requires_grad for p in net.parameters()) and not any(m.training for m in net.modules())


def same_state(net, state_dict):
    return all(torch.equal(t.cpu(), state_dict[k].cpu()) for k, t in net.state_dict().items())


LIA_TINY = (
    "--resolution 16 --width 8 --latent-dim 8 --n-mapping 2 --encoder-width 8 --batch-size 8 --eval-images 16 "
    "--eval-every 2 --save-every 2 --log-every 1 --ppl-samples 0 --refine-images 4 --refine-steps 1 --no-track"
).split()


@pytest.fixture(scope="module")
def lia_stages(tmp_path_factory):
    """A tiny stage-1 and stage-2 run, in this process."""
    d = tmp_path_factory.mktemp("lia_wiring")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        lia.train_gan(lia.parse_args([*LIA_TINY, "--stage", "gan", "--images", "16", "--run-name", "g"]))
        gan = str(d / "runs/g/checkpoint.pt")
        lia.train_encoder(
            lia.parse_args([*LIA_TINY, "--stage", "encoder", "--gan", gan, "--images", "16", "--run-name", "e"])
        )
    return d, gan, str(d / "runs/e/checkpoint.pt")


def test_lia_gan_stage_randomizes_phi_and_trains_it_at_its_lr_multiplier(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    seen = stop_at_first_call(monkeypatch, lia, "gan_step")
    args = lia.parse_args([*LIA_TINY, "--stage", "gan", "--images", "16", "--mapping-lr-mul", "0.03"])
    with pytest.raises(Stop):
        lia.train_gan(args)
    G, _, opt_g = seen["args"][:3]
    assert all(step.net[-1].weight.abs().sum() > 0 for step in G.mapping.steps)  # not the zero (permutation) init
    mapping, synthesis = opt_g.param_groups
    assert [id(p) for p in mapping["params"]] == [id(p) for p in G.mapping.parameters()]
    assert [id(p) for p in synthesis["params"]] == [id(p) for p in G.synthesis.parameters()]
    assert mapping["lr"] == pytest.approx(args.lr * 0.03) and synthesis["lr"] == args.lr


def test_lia_encoder_stage_freezes_g_and_starts_c_from_stage_one(monkeypatch, lia_stages):
    d, gan, _ = lia_stages
    monkeypatch.chdir(d)
    seen = stop_at_first_call(monkeypatch, lia, "encoder_step")
    with pytest.raises(Stop):
        lia.train_encoder(lia.parse_args([*LIA_TINY, "--stage", "encoder", "--gan", gan, "--run-name", "spy"]))
    G, E, D, opt_e, opt_d = seen["args"][:5]
    stage1 = common.load_checkpoint(gan)["state_dicts"]
    assert is_frozen(G) and same_state(G, stage1["G_ema"])  # g is stage 1's EMA generator, frozen
    assert same_state(D, stage1["D"]) and all(p.requires_grad for p in D.parameters())  # c goes on from stage 1's
    assert params_of(opt_e) == [id(p) for p in E.parameters()] and params_of(opt_d) == [id(p) for p in D.parameters()]


def test_lia_refine_stage_freezes_g_and_f_of_the_encoder_checkpoint(monkeypatch, lia_stages):
    d, _, encoder = lia_stages
    monkeypatch.chdir(d)
    seen = stop_at_first_call(monkeypatch, lia, "refine_shares")
    with pytest.raises(Stop):
        lia.train_refine(lia.parse_args([*LIA_TINY, "--stage", "refine", "--ckpt", encoder]))
    G, E = seen["args"][:2]
    stage2 = common.load_checkpoint(encoder)["state_dicts"]
    assert is_frozen(G) and is_frozen(E) and same_state(G, stage2["G"]) and same_state(E, stage2["E"])


# ------------------------------------------------------------------------------------------------- the other loops
def test_regressor_stage_freezes_the_generator_it_was_given(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    tiny = "--resolution 16 --width 8 --d-width 8 --latent-dim 8 --batch-size 8 --eval-images 16 --no-track".split()
    ri.train_gan(ri.parse_args([*tiny, "--stage", "gan", "--images", "16", "--run-name", "g"]))
    seen = stop_at_first_call(monkeypatch, ri, "regressor_step")
    with pytest.raises(Stop):
        ri.train_regressor(ri.parse_args(["--generator", "runs/g/checkpoint.pt", "--encoder-width", "4", "--no-track"]))
    G, E, opt, s = seen["args"][:4]
    assert is_frozen(G) and same_state(G, common.load_checkpoint("runs/g/checkpoint.pt")["state_dicts"]["G_ema"])
    assert params_of(opt) == [id(p) for p in E.parameters()] and torch.equal(s, torch.ones(8))


def test_dlsgan_and_invgan_optimizers_hold_their_networks(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    tiny = "--resolution 16 --width 8 --latent-dim 8 --batch-size 8 --eval-images 16 --images 16 --no-track".split()
    seen = stop_at_first_call(monkeypatch, dlsgan, "g_step")
    with pytest.raises(Stop):
        dlsgan.train(dlsgan.parse_args([*tiny, "--arch", "dcgan", "--v-window", "16"]))
    G, D, opt_g, s = seen["args"][:4]
    assert params_of(opt_g) == [id(p) for p in G.parameters()] and torch.equal(s, torch.ones(8))  # v starts at 1
    seen = stop_at_first_call(monkeypatch, invgan, "g_step")
    args = invgan.parse_args([*tiny, "--w-dim", "8"])
    with pytest.raises(Stop):
        invgan.train(args)
    G, D, opt_g, opt_dr = seen["args"][:4]
    assert params_of(opt_g) == [id(p) for p in G.parameters()]
    assert params_of(opt_dr) == [id(p) for p in D.parameters()] and opt_dr.param_groups[0]["lr"] == args.lr
