"""One module per method, each with the same names (CONTRIBUTING.md, "Adding a method"):

- ``Settings``: the method's options, a frozen dataclass, TRL's names in brackets;
- ``batches(rows, tokenizer, batch_size, max_length)``: step -> that step's typed batch (``rlcourse.batches``);
  the online methods' batches are ``rollouts.Rollouts``;
- ``<method>_step(model, batch, settings)``: (loss, metrics), and ``step_fn(settings)`` for ``rlcourse.train.train``
  (a small class with ``state_dict`` where the step carries state: BCO, DRO);
- ``trl_kwargs(settings, ...)`` and ``trl_classes()``: the TRL trainer and config that run the same thing.

sft, reward_model, dpo, ipo, cpo, simpo, orpo, kto, bco, dro, rloo, grpo; ``rollouts`` is what the online ones
share. The losses themselves live in ``rlcourse.losses``.
"""
