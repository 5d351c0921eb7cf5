"""Models bundled with hessq."""

from hessq.models._resnet import BasicBlock, ResNet, resnet20

__all__ = ["BasicBlock", "ResNet", "resnet20"]

from hessq.models._efficientnet import EfficientNetLite, efficientnet_lite0, preprocess_lite  # noqa: E402

__all__ += ["EfficientNetLite", "efficientnet_lite0", "preprocess_lite"]

from hessq.models._minilm import (  # noqa: E402
    FinetuneRecipe,
    cached_finetune,
    classifier_accuracy,
    finetune_classifier,
    finetuned_path,
    minilm,
    minilm_finetuned,
)

__all__ += ["FinetuneRecipe", "cached_finetune", "classifier_accuracy", "finetune_classifier", "finetuned_path",
            "minilm", "minilm_finetuned"]

from hessq.models._codenet import (  # noqa: E402
    CoDeNet,
    CodeNetTask,
    Detections,
    centernet_loss,
    codenet,
    codenet_task,
    decode_detections,
    evaluate_detector,
    trained_codenet,
)

__all__ += ["CoDeNet", "CodeNetTask", "Detections", "centernet_loss", "codenet", "codenet_task", "decode_detections",
            "evaluate_detector", "trained_codenet"]
