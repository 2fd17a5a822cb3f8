"""Pure tensor maths of RLHF: advantages, policy/value/preference losses, KL estimators and controllers.
No models, no data, no distributed code: only torch. Everything here is unit-tested on the CPU."""
