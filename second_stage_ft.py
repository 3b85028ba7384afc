"""Second fine-tuning stage: as the first, but only the modules nearest the output train (``model.SECOND_STAGE``, the
network's own list: PromptIR's ``model.STAGE2_MODULES`` refinement, output, decoder_level1, noise_level1,
reduce_noise_level1, up2_1; AdaIR's ``adair.STAGE2_MODULES`` refinement, output, decoder_level1, fre3, up2_1); the
rest is frozen and the optimizer sees only the trainable parameters.

    python second_stage_ft.py --data_dir datasets --checkpoint gfl_ft_first/best.pth --fp16 --save_dir gfl_ft_second
    python second_stage_ft.py --data_dir datasets --checkpoint gfl_ft_second/best.pth --save_dir gfl_ft_second_again

--trainable MODULE ... picks other top-level modules (second_stage among them stands for the list above). Running it
again from its own output continues fine-tuning with a fresh schedule (the original's "stage 2 again").
"""
import trainer
from model import SECOND_STAGE

DEFAULTS = {"lr": 1.5e-4, "epochs": 100, "warmup_epochs": 5, "loss": "gfl", "augment": "views",
            "save_dir": "ft_second", "trainable": [SECOND_STAGE]}

build_parser, main = trainer.fine_tuning_cli(DEFAULTS, __doc__)


if __name__ == "__main__":
    main()
