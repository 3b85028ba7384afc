"""First fine-tuning stage: continue from a trained checkpoint with every parameter trainable, a fresh optimizer
and schedule, and only random crops and dihedral views (no CutBlur, Mixup or Blend).

    python first_stage_ft.py --data_dir datasets --checkpoint gfl_ckpt/best.pth --fp16 --save_dir gfl_ft_first

--checkpoint takes a checkpoint file or a run folder (its best.pth). The model's sizes come from the checkpoint (its
model_config) when it has them, else from --preset. Every option of trainer.py applies; only the defaults differ
(lr 1.5e-4, 100 epochs, 5 warm-up epochs, --augment views, --save_dir ft_first).
"""
import trainer

DEFAULTS = {"lr": 1.5e-4, "epochs": 100, "warmup_epochs": 5, "loss": "gfl", "augment": "views",
            "save_dir": "ft_first", "trainable": None}

build_parser, main = trainer.fine_tuning_cli(DEFAULTS, __doc__)


if __name__ == "__main__":
    main()
