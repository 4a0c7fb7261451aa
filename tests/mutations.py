"""Break the methods on purpose and watch the tests fail: each mutation below changes one line of a method's central
equation or wiring (a detach in the wrong place, a weight ignored, a network left unfrozen, the wrong init), in a
copy of the repository; the tests that should see it are run on the copy. A mutation the tests survive is a hole.

    python tests/mutations.py                 # all, about 3 minutes on 2 CPU cores
    python tests/mutations.py invgan lia      # the mutations of some files only
    python tests/mutations.py load_images     # or those whose name contains a word
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["tests/test_gradients.py"]

# (name, file, original text, mutated text, the test files to run when the fast ones do not fail)
MUTATIONS = [
    # --- the mutations an independent review found surviving (issue 26)
    (
        "InvGAN D step ignores --lambda-latent",
        "invgan.py",
        "loss = adv + args.lambda_latent * l_lat",
        "loss = adv + l_lat",
        ["tests/test_invgan.py"],
    ),
    (
        "InvGAN MMD with M(z) detached",
        "invgan.py",
        'terms["mmd"] = common.mmd_rbf(w.float(), w_r.float())',
        'terms["mmd"] = common.mmd_rbf(w.detach().float(), w_r.float())',
        ["tests/test_invgan.py"],
    ),
    (
        "InvGAN G-step latent target M(z) detached",
        "invgan.py",
        '"latent": latent_loss(w_all, w_tilde)}',
        '"latent": latent_loss(torch.cat([w.detach(), w_all[len(w):]]), w_tilde)}',
        ["tests/test_invgan.py"],
    ),
    (
        "InvGAN G-step prediction w~ detached",
        "invgan.py",
        '"latent": latent_loss(w_all, w_tilde)}',
        '"latent": latent_loss(w_all, w_tilde.detach())}',
        ["tests/test_invgan.py"],
    ),
    (
        "InvGAN D-step latent target D_w(x_real) not held fixed",
        "invgan.py",
        "        x_gen = G.synthesis(w)\n    x_real = x_real.detach()",
        "        x_gen = G.synthesis(w)\n    w = torch.cat([w[:n_prior], D(x_real[:n_real])[1]]) if n_real else w\n"
        "    x_real = x_real.detach()",
        ["tests/test_invgan.py"],
    ),
    (
        "InvGAN L_fm with f(x_real) not detached",
        "invgan.py",
        "w_r, f_real = (w_r if args.grad_through_wr else w_r.detach()), f_real.detach()",
        "w_r, f_real = (w_r if args.grad_through_wr else w_r.detach()), f_real",
        ["tests/test_invgan.py"],
    ),
    (
        "InvGAN cycle term with w~ detached (target)",
        "invgan.py",
        'terms["cycle"] = latent_loss(w_tilde, D_enc(G.synthesis(w_tilde))[1])',
        'terms["cycle"] = latent_loss(w_tilde.detach(), D_enc(G.synthesis(w_tilde))[1])',
        ["tests/test_invgan.py"],
    ),
    (
        "InvGAN cycle term with w~ detached (input)",
        "invgan.py",
        'terms["cycle"] = latent_loss(w_tilde, D_enc(G.synthesis(w_tilde))[1])',
        'terms["cycle"] = latent_loss(w_tilde, D_enc(G.synthesis(w_tilde.detach()))[1])',
        ["tests/test_invgan.py"],
    ),
    (
        "regressor: generator unfrozen inside train_regressor",
        "regressor_inversion.py",
        'device, x_test, G, s = run.device, run.x_test, gen["G"], gen["latent_scale"]',
        'device, x_test, G, s = run.device, run.x_test, gen["G"].requires_grad_(True), gen["latent_scale"]',
        ["tests/test_regressor_inversion.py"],
    ),
    (
        "LIA refine init 'encoder' returns the mean code",
        "lia.py",
        '        if init == "encoder":\n            return E(x)',
        '        if init == "encoder":\n            return E(x).mean(0, keepdim=True).repeat(n, 1)',
        ["tests/test_lia.py"],
    ),
    (
        "LIA mean init is phi^-1(mean z)",
        "lia.py",
        "return torch.cat([phi_inverse(G, c) for c in z.split(1000)]).mean(0, keepdim=True).repeat(n, 1)",
        "return phi_inverse(G, z.mean(0, keepdim=True)).repeat(n, 1)",
        ["tests/test_lia.py"],
    ),
    (
        "LIA random init is a raw z",
        "lia.py",
        '        return phi_inverse(\n            G, common.sample_z(n, d, "normal", "cpu", '
        "torch.Generator().manual_seed(seed + 1)).to(device)\n"
        "        )",
        '        return common.sample_z(n, d, "normal", "cpu", torch.Generator().manual_seed(seed + 1)).to(device)',
        ["tests/test_lia.py"],
    ),
    (
        "LIA stage-2 discriminator not loaded from stage 1",
        "lia.py",
        'None if run.ckpt else ckpt["state_dicts"]["D"], "the discriminator"',
        'None, "the discriminator"',
        ["tests/test_lia.py"],
    ),
    (
        "LIA randomize_phi not called",
        "lia.py",
        '    if args.mapping == "invertible":\n        randomize_phi(G)\n',
        '    if args.mapping == "invertible":\n        pass\n',
        ["tests/test_lia.py"],
    ),
    (
        "LIA phi trained without its lr multiplier",
        "lia.py",
        '"lr": args.lr * (1.0 if builtin else args.mapping_lr_mul)}',
        '"lr": args.lr}',
        ["tests/test_lia.py"],
    ),
    (
        "coupling non-linearity replaced by the identity",
        "common.py",
        "nn.Linear(half, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, half",
        "nn.Linear(half, hidden), nn.Identity(), nn.Linear(hidden, half",
        ["tests/test_lia.py", "tests/test_common.py"],
    ),
    # --- this project's own
    (
        "DLSGAN D step ignores --lambda-enc",
        "dlsgan.py",
        "        loss = adv + lambda_enc * l_enc\n",
        "        loss = adv + l_enc\n",
        ["tests/test_dlsgan.py"],
    ),
    (
        "DLSGAN L_enc without the s^2 weights",
        "dlsgan.py",
        "return ((z - z_hat.float()).square() * s.square()).mean()",
        "return (z - z_hat.float()).square().mean()",
        ["tests/test_dlsgan.py"],
    ),
    (
        "DLSGAN G step leaves D trainable",
        "dlsgan.py",
        "    D.requires_grad_(False)\n    z = common.sample_z(batch",
        "    z = common.sample_z(batch",
        ["tests/test_dlsgan.py"],
    ),
    (
        "DLSGAN --dg term with the prediction detached",
        "dlsgan.py",
        "            loss = loss + lambda_enc * l_enc\n",
        "            loss = loss + lambda_enc * l_enc.detach()\n",
        ["tests/test_dlsgan.py"],
    ),
    (
        "InvGAN MMD with w_R detached",
        "invgan.py",
        'terms["mmd"] = common.mmd_rbf(w.float(), w_r.float())',
        'terms["mmd"] = common.mmd_rbf(w.float(), w_r.detach().float())',
        ["tests/test_invgan.py"],
    ),
    (
        "LIA c learns on a live reconstruction (f gets c's gradient)",
        "lia.py",
        "fake_logit, _ = D(x_rec.detach())",
        "fake_logit, _ = D(x_rec)",
        ["tests/test_lia.py"],
    ),
    (
        "LIA encoder step ignores beta1",
        "lia.py",
        "loss = pixel.mean() + args.beta1 * perceptual.mean()",
        "loss = pixel.mean() + 5e-5 * perceptual.mean()",
        ["tests/test_lia.py"],
    ),
    (
        "LIA f's adversarial term on the real images, not on x~",
        "lia.py",
        "    fake_logit, _ = D(x_rec)\n    adv = common.g_adv_loss(args.loss, fake_logit)",
        "    fake_logit, _ = D(x_real)\n    adv = common.g_adv_loss(args.loss, fake_logit)",
        ["tests/test_lia.py"],
    ),
    (
        "regressor ignores lambda_p",
        "regressor_inversion.py",
        "args.lambda_p * l_p",
        "l_p",
        ["tests/test_regressor_inversion.py"],
    ),
    (
        "regressor's reconstruction with z_hat detached",
        "regressor_inversion.py",
        "    x_hat = G(z_hat * s)\n    l_pix",
        "    x_hat = G(z_hat.detach() * s)\n    l_pix",
        ["tests/test_regressor_inversion.py"],
    ),
    (
        "regressor GAN's G step leaves D trainable",
        "regressor_inversion.py",
        '    D.requires_grad_(False)\n    g_loss = common.g_adv_loss("logistic"',
        '    g_loss = common.g_adv_loss("logistic"',
        ["tests/test_regressor_inversion.py"],
    ),
    (
        "regressor GAN's G step on a detached fake",
        "regressor_inversion.py",
        'g_loss = common.g_adv_loss("logistic", D(x_fake)[0])',
        'g_loss = common.g_adv_loss("logistic", D(x_fake.detach())[0])',
        ["tests/test_regressor_inversion.py"],
    ),
    (
        "LIA stage-1 R1 weight ignored",
        "lia.py",
        "(d_loss + r1_weight * r1).backward()\n    common.sync_gradients(D)\n    opt_d.step()\n\n"
        "    D.requires_grad_(False)",
        "(d_loss + r1).backward()\n    common.sync_gradients(D)\n    opt_d.step()\n\n    D.requires_grad_(False)",
        ["tests/test_lia.py"],
    ),
    (
        "InvGAN encoder step through w_R never taken",
        "invgan.py",
        "    if args.grad_through_wr:\n        opt_dr.step()",
        "    if False:\n        opt_dr.step()",
        ["tests/test_invgan.py"],
    ),
    (
        "InvGAN --fm-form eq2 keeps the expectation outside the norm",
        "invgan.py",
        'return (diff.mean(0) if form == "eq2" else diff).square().mean()',
        "return diff.square().mean()",
        ["tests/test_invgan.py"],
    ),
    (
        "InvGAN --min-d-on-fakes leaves D's encoding of G's images fixed",
        "invgan.py",
        "D_enc = D if args.min_d_on_fakes else D_fixed",
        "D_enc = D_fixed",
        ["tests/test_invgan.py"],
    ),
    (
        "regressor --mask-keep above ignored",
        "common.py",
        'kept = up < cutoff if keep == "below" else up >= cutoff',
        "kept = up < cutoff",
        ["tests/test_common.py"],
    ),
    (
        "eval RandRecFID scores the samples themselves",
        "eval.py",
        '"randrec": lambda: batched(inv.decode, batched(inv.encode, samples[: args.n_fid], bs), bs),',
        '"randrec": lambda: samples[: args.n_fid],',
        ["tests/test_eval.py"],
    ),
    (
        "eval optimization loss on the clamped image",
        "eval.py",
        "x_rec = inv.synthesize(space, code, clamp=False)",
        "x_rec = inv.synthesize(space, code)",
        ["tests/test_eval.py"],
    ),
    (
        "eval in-domain without its VGG term",
        "eval.py",
        "if vgg is not None and vgg_weight:",
        "if False:",
        ["tests/test_eval.py"],
    ),
    (
        "eval --opt-loss lpips keeps the MSE",
        "eval.py",
        'return {**kw, "pixel": args.opt_loss != "lpips"}, args.opt_loss',
        'return {**kw, "pixel": True}, args.opt_loss',
        ["tests/test_eval.py"],
    ),
    (
        "eval inverts a tiled InvGAN checkpoint untiled",
        "common.py",
        "self.tiles_per_side = full // crop if crop and full > crop else 0",
        "self.tiles_per_side = 0",
        ["tests/test_invgan.py::test_tiled_training_run"],
    ),
    (
        "LIA phi's movement measured against the trained phi",
        "lia.py",
        "phi_init = copy.deepcopy(G.mapping).requires_grad_(False)",
        "phi_init = G.mapping",
        ["tests/test_lia.py"],
    ),
    # --- inversion of a user's images (issue 27)
    (
        "Inverter decodes every code as z (ignores the encoder's space)",
        "common.py",
        "return self.synthesize(space or self.encoder_space, code)",
        'return self.synthesize(space or "z", code)',
        [
            "tests/test_invgan.py::test_tiled_training_run",
            "tests/test_eval.py::test_defaults_trains_each_method_once_then_reuses_it",
        ],
    ),
    (
        "load_images squashes a non-square image instead of center-cropping it",
        "common.py",
        'if fit == "squash" or w == h:',
        "if True:",
        ["tests/test_eval.py::test_invert_a_folder_of_odd_files_end_to_end"],
    ),
    (
        "--refine starts from the mean code, not the encoder's",
        "eval.py",
        'optimize_batched(inv, x, inv.space, "encoder", args.refine, args, loss_kw, masks)',
        'optimize_batched(inv, x, inv.space, "mean", args.refine, args, loss_kw, masks)',
        ["tests/test_eval.py::test_invert_a_folder_of_odd_files_end_to_end"],
    ),
    (
        "--inpaint: the optimization sees the hole",
        "eval.py",
        "        m = None if masks is None else masks[chunk]",
        "        m = None",
        ["tests/test_eval.py::test_inpaint_never_sees_the_hole_of_a_mask_file"],
    ),
    (
        "--mix mixes nothing",
        "common.py",
        "            ws[:, list(layers)] = w_src[i] if w_src.dim() == 2 else w_src[i, list(layers)]\n",
        "",
        ["tests/test_eval.py::test_invert_a_folder_of_odd_files_end_to_end"],
    ),
    (
        "--interpolate decodes A's code at every step",
        "eval.py",
        "torch.lerp(codes[:1], codes[1:], float(t))",
        "codes[:1]",
        ["tests/test_eval.py::test_invert_a_folder_of_odd_files_end_to_end"],
    ),
    (
        "an encoder's time is the encode alone again",
        "eval.py",
        '"seconds_per_image": (t2 - t0) / len(x_recon),',
        '"seconds_per_image": (t1 - t0) / len(x_recon),',
        ["tests/test_eval.py::test_comparison_end_to_end"],
    ),
    (
        "Inverter ignores DLSGAN's latent scale",
        "common.py",
        '        scale = inversion.get("latent_scale")\n        self.s =',
        "        scale = None\n        self.s =",
        ["tests/test_eval.py::test_load_inverter_reconstructs_as_dlsgan_itself_with_the_saved_latent_scale"],
    ),
    (
        "two files with one name: one of them dropped",
        "common.py",
        'fallback(rel, top).replace(os.sep, "__") if names.count(name) > 1 else name',
        "name",
        ["tests/test_eval.py::test_invert_a_folder_of_odd_files_end_to_end"],
    ),
    (
        "--claims reuses a run of another configuration",
        "eval.py",
        'name = f"{prefix}__{digest}"',
        "name = prefix",
        [
            "tests/test_eval.py::test_claims_train_what_is_missing_reuse_what_is_the_same_and_never_a_changed_configuration"
        ],
    ),
    # --- the claims' wiring (issue 28)
    (
        "--claims evaluates LIA's gan stage, not its encoder",
        "eval.py",
        'return f"{run_dir}__encoder/checkpoint.pt" if method',
        'return f"{run_dir}__gan/checkpoint.pt" if method',
        [
            "tests/test_eval.py::test_the_ranking_reads_each_methods_own_encoder_row",
            "tests/test_eval.py::test_claims_train_what_is_missing_reuse_what_is_the_same_and_never_a_changed_configuration",
        ],
    ),
    (
        "--claims ranks LIA by its MLP arm",
        "eval.py",
        'CLAIM_EVALS["recon"][1] if lab != "mlp"}',
        'CLAIM_EVALS["recon"][1]}',
        ["tests/test_eval.py::test_the_ranking_reads_each_methods_own_encoder_row"],
    ),
    (
        "--claims reads an optimization row as the encoder's",
        "eval.py",
        'if r.get("checkpoint") == ckpt and ("baseline" in r) == baseline]',
        'if r.get("checkpoint") == ckpt]',
        ["tests/test_eval.py::test_the_ranking_reads_each_methods_own_encoder_row"],
    ),
    (
        "'faster' with the winner and the other swapped",
        "eval.py",
        "return math.log10(b / a) - margin",
        "return math.log10(a / b) - margin",
        ["tests/test_eval.py::test_claim_effect_on_hand_made_values"],
    ),
    (
        "'well below' without its margin",
        "eval.py",
        "return b - a - margin",
        "return b - a",
        ["tests/test_eval.py::test_claim_effect_on_hand_made_values"],
    ),
    (
        "'near' with its sign flipped",
        "eval.py",
        "return margin - abs(a - b)",
        "return abs(a - b) - margin",
        ["tests/test_eval.py::test_claim_effect_on_hand_made_values"],
    ),
    (
        "'close' with the margin against the claim",
        "eval.py",
        "return a - b + margin",
        "return a - b - margin",
        ["tests/test_eval.py::test_claim_effect_on_hand_made_values"],
    ),
    (
        "DLSGAN's 'near 1' read from the DLS run",
        "eval.py",
        '"a": dls("no DLS, DG", "losses/L_enc"),',
        '"a": dls("DLS, DG", "losses/L_enc"),',
        ["tests/test_eval.py::test_every_claim_reads_its_own_runs_value_with_its_kind_and_margin"],
    ),
    (
        "LIA's y-vs-z claim compares against z from the mean",
        "eval.py",
        '"b": lia_refine("z/encoder"),',
        '"b": lia_refine("z/mean"),',
        ["tests/test_eval.py::test_every_claim_reads_its_own_runs_value_with_its_kind_and_margin"],
    ),
    (
        "InvGAN's Table 2 claim reads real-on-reconstructions",
        "eval.py",
        'from_eval("table2", "invgan", "full", "semantic_table/real_on_real")[1]',
        'from_eval("table2", "invgan", "full", "semantic_table/real_on_rec")[1]',
        ["tests/test_eval.py::test_every_claim_reads_its_own_runs_value_with_its_kind_and_margin"],
    ),
    (
        "DLSGAN's real-image claim reads fake PSNR",
        "eval.py",
        '"a": dls("DLS, DG", "eval/real_psnr"),',
        '"a": dls("DLS, DG", "eval/fake_psnr"),',
        ["tests/test_eval.py::test_every_claim_reads_its_own_runs_value_with_its_kind_and_margin"],
    ),
    (
        "Table 2's 'within 5 points' without its margin",
        "eval.py",
        '"margin": 0.05,',
        '"margin": 0.0,',
        ["tests/test_eval.py::test_every_claim_reads_its_own_runs_value_with_its_kind_and_margin"],
    ),
    (
        "the speed claim times the encoder against itself",
        "eval.py",
        '"b": from_eval("completions", "regressor_inversion", "mask", "seconds_per_image", baseline=True),',
        '"b": from_eval("completions", "regressor_inversion", "mask", "seconds_per_image"),',
        ["tests/test_eval.py::test_every_claim_reads_its_own_runs_value_with_its_kind_and_margin"],
    ),
    (
        "the verdict with the population standard deviation",
        "eval.py",
        "float(np.std(effects, ddof=1)) / math.sqrt(len(effects))",
        "float(np.std(effects)) / math.sqrt(len(effects))",
        ["tests/test_eval.py::test_the_verdict_rule_on_hand_made_effects"],
    ),
    (
        "--claims does not pass --data-root on",
        "eval.py",
        'shared = (["--data-root", args.data_root] if args.data_root else [])',
        "shared = ([] if args.data_root else [])",
        [
            "tests/test_eval.py::test_claims_train_what_is_missing_reuse_what_is_the_same_and_never_a_changed_configuration"
        ],
    ),
    (
        "--claims reads a value no run recorded as 0",
        "eval.py",
        "TypeError, ValueError) as e:\n        common.fail(",
        "TypeError, ValueError) as e:\n        return 0.0\n        common.fail(",
        ["tests/test_eval.py::test_a_claim_whose_run_did_not_record_its_value_is_named_in_one_line"],
    ),
    (
        "--claims counts a reused run's own training time, not the time it timed",
        "eval.py",
        'return read_json(path)["wall_s"] if os.path.isfile(path) else fallback',
        "return fallback",
        [
            "tests/test_eval.py::test_claims_train_what_is_missing_reuse_what_is_the_same_and_never_a_changed_configuration"
        ],
    ),
    (
        "--methods comparison trains every claim's runs",
        "eval.py",
        "labels = {label: argv for label, argv in labels.items() if (method, label) in RANKING_RUNS}",
        "labels = dict(labels)",
        ["tests/test_eval.py::test_the_ranking_is_planned_on_each_methods_default_run"],
    ),
    (
        "--methods comparison trains no other method",
        "eval.py",
        'trained = [m for m in METHODS if m in chosen_methods or "comparison" in chosen_methods]',
        "trained = [m for m in METHODS if m in chosen_methods]",
        ["tests/test_eval.py::test_the_ranking_is_planned_on_each_methods_default_run"],
    ),
    (
        "a reused evaluation counts no time",
        "eval.py",
        'return name, None, recorded_wall(os.path.join("runs", name), read_json(results).get("wall_s", 0.0))',
        "return name, None, 0.0",
        [
            "tests/test_eval.py::test_claims_train_what_is_missing_reuse_what_is_the_same_and_never_a_changed_configuration"
        ],
    ),
]


def pytest(copy, files):
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files]
    r = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    failed = [line.split(" ")[1] for line in r.stdout.splitlines() if line.startswith("FAILED ")]
    return r.returncode, failed


def main(only):
    chosen = [m for m in MUTATIONS if not only or any(m[1].startswith(o) or o in m[0] for o in only)]
    survived, t0 = [], time.time()
    for name, path, original, _, _ in chosen:  # every text checked before anything runs
        count = open(os.path.join(ROOT, path)).read().count(original)
        if count != 1:
            sys.exit(f"mutation '{name}': its original text is in {path} {count} times, not once; update mutations.py")
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "repo")
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("runs", ".git", "__pycache__", "*.png", "docs"))
        for name, path, original, mutated, slow in chosen:
            source = open(os.path.join(ROOT, path)).read()
            with open(os.path.join(copy, path), "w") as f:
                f.write(source.replace(original, mutated))
            rc, failed = pytest(copy, FAST)
            if rc == 0:
                rc, failed = pytest(copy, slow)
            with open(os.path.join(copy, path), "w") as f:
                f.write(source)
            verdict = f"caught by {failed[0]}" if failed else ("caught (exit %d)" % rc if rc else "SURVIVED")
            print(f"{name:<62} {verdict}", flush=True)
            if rc == 0:
                survived.append(name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutations caught ({time.time() - t0:.0f} s)")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
