"""SFTMix on UltraChat-200K (or any multi-turn `messages` data), all stages or one at a time.

    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml \
        recipes/ultrachat.py --config recipes/llama-3.1-8b/sftmix_ultrachat.yaml [--stage reference|score|sftmix|all]

Every field of the config can be overridden on the command line (`--learning_rate 1e-5`). See `sftmix_trl.recipe`.
"""

from sftmix_trl.recipe import main

if __name__ == "__main__":
    main()
