"""The machinery shared by every hf_vpt method: sequence surgery, routing, the tuner and its block wrapper."""
