"""Everything after curation, one subpackage per step of the method: model families (`backbones`), the latent
reward model (`lrm`), latent preference optimisation (`lpo`), evaluation (`eval`), the reward service (`serve`),
and the toy world with `lpo demo` (`toy`)."""
