"""Multistep DPM-Solver++ (order 2) sampling, Open-Sora's "dpm-solver" scheduler.

The solver is diffusers' `DPMSolverMultistepScheduler` on the same 1000-step linear-beta
schedule the models were trained with. Configured as below it takes the steps Open-Sora's own
DPM-Solver takes (time-uniform from t=999 down to t=0, second-order multistep updates, ending at
alpha-bar of step 0 rather than at zero noise): on the same model the two agree to ~1e-6 relative
at 20 steps; they differ only in rounding the model's timesteps to integers and, for 10 to 14
steps, in a first-order last step. This module adds the model-call signature and the
classifier-free guidance convention shared with `IDDPM`.
"""

import torch
from tqdm import tqdm

from .iddpm import check_guidance, check_sample_inputs, check_sampling_steps, guided_output


class DPMSolver:
    """Deterministic DPM-Solver++ sampler for eps-predicting models."""

    def __init__(self, num_sampling_steps=20, cfg_scale=4.0, cfg_channel=None):
        check_sampling_steps(num_sampling_steps, 1000)
        check_guidance(cfg_scale, cfg_channel)
        # Imported here: diffusers takes seconds to import and only this sampler needs it.
        from diffusers import DPMSolverMultistepScheduler

        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel
        self.solver = DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            beta_schedule="linear",
            beta_start=0.0001,
            beta_end=0.02,
            algorithm_type="dpmsolver++",
            solver_order=2,
            prediction_type="epsilon",
            final_sigmas_type="sigma_min",
        )

    @torch.no_grad()
    def sample(self, model, z, y, y_null, mask=None, progress=True, generator=None):
        """Solve the probability-flow ODE from noise z (B, C, T, H, W) to x_0.

        The model is called as in `IDDPM.sample` (doubled batch, [y; y_null], original 1000-step
        timesteps); only its first C output channels, the eps prediction, are used. `generator`
        is accepted for the common signature: the solver draws no random numbers.
        """
        check_sample_inputs(z, y, y_null, mask)
        channels = z.shape[1]
        # set_timesteps also clears the solver's history, so each call starts afresh.
        self.solver.set_timesteps(self.num_sampling_steps, device=z.device)
        # diffusers computes in float32 and returns the model output's dtype: keep eps float32.
        x = z.float()
        for timestep in tqdm(self.solver.timesteps, disable=not progress):
            t = timestep.expand(x.shape[0])
            eps = guided_output(model, x, t, y, y_null, mask, self.cfg_scale, self.cfg_channel)[:, :channels]
            x = self.solver.step(eps.float(), timestep, x).prev_sample
        return x.to(z.dtype)
