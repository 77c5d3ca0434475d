"""The training options kohya sd-scripts users bring (loss_type and the Huber schedules, multires
noise, input perturbation, clip_skip, optimizer and scheduler arguments): each formula restated
here from its definition and compared with what the trainer computes, plus the refusals."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from lokr_diffusion.errors import ConfigError
from lokr_diffusion.families import get_family
from lokr_diffusion.training.config import config_from_dict
from lokr_diffusion.training.loss import (LossFunction, NoiseOptions, ddpm_noise_level, denoising_loss,
                                          diffusion_loss, flow_matching_loss, huber_threshold)
from lokr_diffusion.training.optim import build_lr_scheduler, build_optimizer

from .helpers import load_components


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _train(**train) -> object:
    raw = {"model": {"pretrained_model": "x"}, "data": {"dir": "d"}, "train": {"max_steps": 1, **train}}
    return config_from_dict(raw).train


# -- loss_type and the Huber threshold ------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_threshold_follows_the_sd_scripts_schedule_over_ddpm_timesteps(schedule):
    sched, c, scale = _scheduler(), 0.2, 1.5
    t = torch.tensor([0, 1, 250, 500, 999])
    position, ratio = ddpm_noise_level(sched, t)
    got = huber_threshold(schedule, c, scale, position, ratio)
    a = sched.alphas_cumprod[t].double()
    if schedule == "constant":
        want = torch.full((5,), c * scale, dtype=torch.float64)
    elif schedule == "exponential":  # exp(-alpha t), alpha = -ln(c) / T
        want = torch.exp(-(-math.log(c) / 1000) * t.double()) * scale
    else:  # sigma = sqrt((1 - a) / a); (1 - c) / (1 + sigma)^2 + c
        want = (1 - c) / (1 + ((1 - a) / a).sqrt()) ** 2 + c
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["l2", "l1", "huber", "smooth_l1"])
def test_ddpm_loss_is_per_sample_then_min_snr_then_sample_weights(kind):
    sched, c, gamma = _scheduler(), 0.1, 5.0
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 400, 900])
    weights = torch.tensor([1.0, 2.0, 0.5])
    got = diffusion_loss(pred, target, t, sched, "epsilon", min_snr_gamma=gamma, sample_weights=weights,
                         loss_fn=LossFunction(kind, huber_c=c, huber_schedule="snr"))
    a = sched.alphas_cumprod[t]
    d = (pred - target).double()
    thr = ((1 - c) / (1 + ((1 - a) / a).sqrt()) ** 2 + c).double().view(3, 1, 1, 1)
    element = {"l2": d**2, "l1": d.abs(), "huber": 2 * thr * ((d**2 + thr**2).sqrt() - thr),
               "smooth_l1": 2 * ((d**2 + thr**2).sqrt() - thr)}[kind]
    snr = (a / (1 - a)).double()
    want = (element.mean(dim=(1, 2, 3)) * torch.clamp(snr, max=gamma) / snr * weights).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_huber_is_quadratic_for_small_errors_and_linear_for_large_ones():
    fn = LossFunction("huber", huber_c=1.0, huber_schedule="constant")
    small, large, zero = torch.full((1, 1, 1, 1), 0.05), torch.full((1, 1, 1, 1), 50.0), torch.zeros(1, 1, 1, 1)
    pos = torch.zeros(1)
    assert fn.per_sample(small, zero, pos, pos).item() == pytest.approx(0.05**2, rel=2e-3)  # ~ d^2
    assert fn.per_sample(large, zero, pos, pos).item() == pytest.approx(2 * 50 - 2, rel=1e-3)  # ~ 2c|d| - 2c^2


@pytest.mark.parametrize("kind,schedule", [("huber", "snr"), ("smooth_l1", "exponential"), ("l1", "snr")])
def test_flow_loss_schedules_the_threshold_by_the_path_position(kind, schedule):
    """Rectified flow: position s (timestep s * 1000 of 1000) and noise-to-signal ratio s / (1 - s);
    the snr schedule is then (1 - c)(1 - s)^2 + c, the exponential one c^s."""
    c = 0.15
    latents = torch.randn(4, 4, 8, 8)
    seen = {}

    def denoise(noisy, timesteps):
        seen["noisy"], seen["t"] = noisy, timesteps
        return torch.zeros_like(noisy)

    got = flow_matching_loss(latents, denoise, 3.0, sampling="uniform",
                             loss_fn=LossFunction(kind, huber_c=c, huber_schedule=schedule))
    s = (seen["t"] / 1000).double().view(-1, 1, 1, 1)
    noise = (seen["noisy"].double() - (1 - s) * latents.double()) / s
    d = -(noise - latents.double())  # prediction 0 minus the velocity target
    thr = (1 - c) * (1 - s) ** 2 + c if schedule == "snr" else c**s
    element = {"huber": 2 * thr * ((d**2 + thr**2).sqrt() - thr), "smooth_l1": 2 * ((d**2 + thr**2).sqrt() - thr),
               "l1": d.abs()}[kind]
    torch.testing.assert_close(got.double(), element.mean(), rtol=1e-4, atol=1e-6)


def test_l2_is_the_default_and_unchanged():
    sched = _scheduler()
    pred, target, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    plain = diffusion_loss(pred, target, t, sched, "epsilon")
    assert torch.equal(plain, torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)).mean())
    assert _train().loss_type == "l2"


# -- multires noise and input perturbation ----------------------------------------------------------

def test_multires_noise_is_offset_noise_plus_a_pyramid_scaled_to_unit_std():
    latents = torch.zeros(2, 4, 64, 64)
    torch.manual_seed(3)
    got = NoiseOptions(offset=0.05, multires_iterations=4, multires_discount=0.5).draw(latents)
    torch.manual_seed(3)  # the same draws, restated: white noise, per-channel offset, then each level
    want = torch.randn_like(latents) + 0.05 * torch.randn(2, 4, 1, 1)
    for i in range(4):
        r = torch.rand(()).item() * 2 + 2
        h = w = max(1, int(64 / r**i))
        want = want + torch.nn.functional.interpolate(torch.randn(2, 4, h, w), size=(64, 64), mode="bilinear") * 0.5**i
    want = want / want.std()
    assert got.shape == latents.shape
    torch.testing.assert_close(got, want)
    assert got.std().item() == pytest.approx(1.0, abs=1e-5)


def test_multires_noise_has_low_frequencies_white_noise_lacks():
    latents = torch.zeros(8, 4, 64, 64)
    white = NoiseOptions().draw(latents)
    pyramid = NoiseOptions(multires_iterations=8, multires_discount=0.8).draw(latents)

    def neighbour_correlation(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert abs(neighbour_correlation(white)) < 0.05
    assert neighbour_correlation(pyramid) > 0.15
    # a channel's mean varies far more than white noise's 1 / (64 * 64)
    assert pyramid.mean(dim=(2, 3)).var().item() > 20 / 4096


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_input_perturbation_noises_the_input_but_keeps_the_target(prediction):
    sched, gamma = _scheduler(), 0.3
    latents = torch.randn(3, 4, 8, 8)
    seen = {}

    def denoise(noisy, timesteps):
        seen["noisy"], seen["t"] = noisy, timesteps
        return torch.zeros_like(noisy)

    torch.manual_seed(7)
    loss = denoising_loss(latents, denoise, sched, prediction, noise=NoiseOptions(ip_gamma=gamma))
    torch.manual_seed(7)  # the same draws: noise, timesteps, then the perturbation
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (3,))
    extra = torch.randn_like(latents)
    assert torch.equal(seen["t"], t)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["noisy"], a.sqrt() * latents + (1 - a).sqrt() * (noise + gamma * extra))
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    torch.testing.assert_close(loss, (target**2).mean())


def test_input_perturbation_on_the_flow_path_and_its_random_strength():
    latents = torch.randn(2, 4, 8, 8)
    seen = {}

    def denoise(noisy, timesteps):
        seen["noisy"], seen["t"] = noisy, timesteps
        return torch.zeros_like(noisy)

    torch.manual_seed(11)
    loss = flow_matching_loss(latents, denoise, 1.0, sampling="uniform",
                              noise=NoiseOptions(ip_gamma=0.5, ip_random_strength=True))
    torch.manual_seed(11)
    noise = torch.randn_like(latents)
    s = torch.rand(2).view(-1, 1, 1, 1)
    extra = torch.randn_like(latents)
    gamma = torch.rand(1) * 0.5
    assert 0 <= gamma.item() < 0.5
    torch.testing.assert_close(seen["noisy"], (1 - s) * latents + s * (noise + gamma * extra))
    torch.testing.assert_close(loss, ((noise - latents) ** 2).mean())


def test_multires_noise_is_refused_for_flow_models_with_the_reason():
    from lokr_diffusion.training.objective import build_objective

    with pytest.raises(ConfigError, match=r"train.multires_noise_iterations: not available for .*flow matching"):
        build_objective(get_family("flux"), None, _train(multires_noise_iterations=6))


# -- clip_skip ----------------------------------------------------------------------------------------

def test_clip_skip_is_the_nth_from_last_layer_plus_the_final_layer_norm(tiny_sd15_path):
    from lokr_diffusion.text import tokenize
    from lokr_diffusion.training.model import text_options

    from transformers import CLIPTokenizer

    family, (te,) = get_family("sd15"), load_components(tiny_sd15_path)[1]
    ids = tokenize([CLIPTokenizer.from_pretrained(str(tiny_sd15_path / "tokenizer"))], ["a red circle", "two squares"])
    tower = getattr(te, "text_model", te)  # transformers 5 has no text_model level
    layers = tower.encoder.layers
    assert text_options(family, 1, [te]) == {}
    assert text_options(family, 2, [te]) == {"clip_skip": 2}
    for skip in range(1, len(layers) + 1):
        captured = {}
        hook = layers[len(layers) - skip].register_forward_hook(
            lambda m, i, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            ours = family.encode_text([te], ids, torch.device("cpu"), clip_skip=skip)["prompt_embeds"]
            want = tower.final_layer_norm(captured["h"])
        hook.remove()
        torch.testing.assert_close(ours, want)
    with pytest.raises(ConfigError, match="more than the text encoder's 2 layers"):
        text_options(family, 3, [te])


def test_samples_read_prompts_through_the_training_encoder(tiny_sd15_path, tmp_path):
    """The sampler's embedding path gives the pipeline's own images at clip_skip 1, other ones at 2."""
    from diffusers import StableDiffusionPipeline

    from lokr_diffusion.text import tokenize
    from lokr_diffusion.training.sampling import sample_grids

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_path), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    family = get_family("sd15")

    def grid(skip=None):
        encode = None if skip is None else (lambda text: family.encode_text(
            [pipe.text_encoder], tokenize([pipe.tokenizer], [text]), torch.device("cpu"), clip_skip=skip))
        return sample_grids(pipe, ["a red circle"], tmp_path, 0, negative_prompt="blurry", steps=2, num_images=1,
                            width=64, height=64, encode_prompt=encode)[0][2]

    own = grid()
    assert (grid(1) == own).all()
    assert not (grid(2) == own).all()


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd35-large"])
def test_clip_skip_is_refused_where_the_family_fixes_the_layers(family):
    from lokr_diffusion.training.model import text_options

    with pytest.raises(ConfigError, match="train.clip_skip: not available for"):
        text_options(get_family(family), 2, [])
    assert text_options(get_family(family), 1, []) == {}


# -- optimizer and scheduler arguments -----------------------------------------------------------------

def test_optimizer_args_reach_the_optimizer_and_weight_decay_is_per_group(tiny_sd15_path):
    from lokr_diffusion.network import AdapterConfig, create_network
    from lokr_diffusion.training.loop import _param_groups

    t = _train(optimizer_args={"betas": [0.8, 0.95], "eps": 1e-6, "amsgrad": True}, weight_decay=0.02,
               text_encoder_weight_decay=0.0)
    unet, tes = load_components(tiny_sd15_path)
    net = create_network(AdapterConfig(algo="lokr", preset="attn-only", dim=2, factor=4), unet=unet,
                         text_encoders=tes, family="sd15")
    opt = build_optimizer(t.optimizer, _param_groups(net, None, t), t.learning_rate, t.weight_decay, t.optimizer_args)
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-6 and opt.defaults["amsgrad"] is True
    unet_group, te_group = opt.param_groups
    assert unet_group["weight_decay"] == 0.02 and te_group["weight_decay"] == 0.0
    assert unet_group["betas"] == te_group["betas"] == (0.8, 0.95)


def test_optimizer_args_for_sgd_and_adafactor():
    p = torch.nn.Parameter(torch.ones(3))
    t = _train(optimizer="sgd", optimizer_args={"momentum": 0.9, "nesterov": True})
    opt = build_optimizer(t.optimizer, [{"params": [p]}], t.learning_rate, t.weight_decay, t.optimizer_args)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    t = _train(optimizer="adafactor", optimizer_args={"clip_threshold": 2.0})
    opt = build_optimizer(t.optimizer, [{"params": [p]}], t.learning_rate, t.weight_decay, t.optimizer_args)
    assert opt.defaults["clip_threshold"] == 2.0 and opt.defaults["relative_step"] is False


@pytest.mark.parametrize("train,needle", [
    ({"optimizer_args": {"beta": [0.9, 0.99]}},
     "train.optimizer_args.beta: AdamW (adamw) takes no such argument (did you mean 'betas'?); it accepts: betas, eps"),
    ({"optimizer": "sgd", "optimizer_args": {"betas": [0.9, 0.99]}}, "SGD (sgd) takes no such argument"),
    ({"optimizer_args": {"lr": 0.1}}, "train.optimizer_args.lr: not allowed here: set train.learning_rate"),
    ({"optimizer_args": {"weight_decay": 0.1}}, "train.optimizer_args.weight_decay: not allowed here: set "
                                                "train.weight_decay"),
    ({"optimizer_args": {"betas": {"a": 1}}}, "train.optimizer_args.betas: expected a number, string, boolean"),
    ({"optimizer_args": 3}, "train.optimizer_args: expected a table"),
    ({"lr_scheduler_num_cycles": 3}, "train.lr_scheduler_num_cycles: only `cosine_with_restarts` has cycles"),
    ({"lr_scheduler": "linear", "lr_scheduler_power": 2.0}, "train.lr_scheduler_power: only `polynomial` has a power"),
    ({"loss_type": "mse"}, "train.loss_type: 'mse' is not one of l2, huber, smooth_l1, l1"),
    ({"huber_schedule": "snr2"}, "train.huber_schedule: 'snr2' is not one of"),
    ({"clip_skip": 0}, "train.clip_skip: must be at least 1"),
])
def test_bad_training_options_name_the_key(train, needle):
    with pytest.raises(ConfigError) as exc:
        _train(**train)
    assert needle in str(exc.value)


def test_a_value_the_optimizer_refuses_names_optimizer_args():
    p = torch.nn.Parameter(torch.ones(3))
    t = _train(optimizer="adafactor", optimizer_args={"relative_step": True})  # needs lr = None
    with pytest.raises(ConfigError, match=r"train.optimizer_args: Adafactor refused relative_step = True"):
        build_optimizer(t.optimizer, [{"params": [p]}], t.learning_rate, t.weight_decay, t.optimizer_args)


def _rates(name: str, steps: int, **kw) -> list[float]:
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_lr_scheduler(name, opt, warmup_steps=0, total_steps=steps, **kw)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_cosine_with_restarts_has_num_cycles():
    rates = _rates("cosine_with_restarts", 100, num_cycles=2)
    # two cosines of 50 steps: 0.5 (1 + cos(pi * (2 t / 100 mod 1)))
    for step in (0, 10, 25, 49, 50, 60, 75, 99):
        assert rates[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * ((2 * step / 100) % 1))), abs=1e-9)
    assert rates[50] == pytest.approx(1.0) and rates[25] == pytest.approx(0.5) and rates[75] == pytest.approx(0.5)
    assert _rates("cosine_with_restarts", 100)[50] == pytest.approx(0.5)  # one cycle: plain cosine


def test_polynomial_has_power():
    end = 1e-7
    rates = _rates("polynomial", 100, power=2.0)
    for step in (0, 20, 50, 90):
        assert rates[step] == pytest.approx((1 - end) * (1 - step / 100) ** 2 + end, rel=1e-9)
    assert _rates("polynomial", 100)[50] == pytest.approx(0.5, abs=1e-6)  # power 1: linear
