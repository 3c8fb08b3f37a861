"""What an extractor replica computes: :class:`ExtractorConfig`, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.limits import MAX_IMAGE_PIXELS
from services.extractor.global_descriptor import GlobalConfig
from services.extractor.local_features import LocalConfig
from services.extractor.runtime import RUNTIMES
from services.space.regions import MAX_REGIONS_PER_IMAGE

DEFAULT_RUNTIME = "openvino"
DEFAULT_QUERY_RUNTIME = "onnxruntime"
DEFAULT_BATCH_IMAGES = 4
DEFAULT_BATCH_WAIT_MS = 2.0
MAX_BATCH_IMAGES = 64


@dataclass(frozen=True)
class ExtractorConfig:
    """What a replica computes.

    Attributes
    ----------
    weights_path : str
        Backbone weights file; "" = the packaged ImageNet EfficientNet-Lite0.
    global_config : GlobalConfig
        Pooling, scales and max side of the global descriptor.
    max_pixels : int
        Decompression-bomb guard: images whose header declares more pixels are refused.
    local_config : LocalConfig
        DELF-style local features (served when a request sets ``want_local``).
    attention_path : str
        Trained attention-head file (``loupe train-attention``); "" = score keypoints by
        feature L2 norm.
    regional_max_side : int
        Longest side of the image the R-MAC regional vectors are pooled from; 0 = the global
        descriptor's largest scale. Default 1024, the working image (its backbone pass is shared
        with the local features): with k-means-reduced regions, regional diffusion on the ROxford
        subset scored Medium mAP 58.0 from 1024-px regions against 54.4 from 512-px ones.
    regions_per_image : int
        The regional vectors are summarised by this many spherical k-means centroids
        (``services.space.regions``), for database images and queries alike; 0 keeps every
        R-MAC region (~21). Default 5, as the paper: regional diffusion on the ROxford subset
        went from Medium mAP 44.6 (every region) to 58.0 (5 centroids).
    query_local_max_side : int
        Longest side of a search query's working image for its local features; 0 = the
        ``local_config.max_side`` database images use. Smaller, the query's local pyramid shares
        the global descriptor's backbone passes instead of running one more at full size.
    runtime : {"torch", "onnxruntime", "openvino"}
        What runs the backbone passes (``services.extractor.runtime``); descriptors match eager
        torch to float rounding. Default from BENCHMARKS.md "Extraction speed (issue 14)".
    query_runtime : {"", "torch", "onnxruntime", "openvino"}
        What runs the passes of search queries (``ExtractRequest.query``); "" = ``runtime``.
        Default ONNX Runtime: a query crop is a new image size almost every time, and OpenVINO
        recompiles its kernels for each new size (BENCHMARKS.md, "Query extraction"), ONNX
        Runtime does not.
    runtime_cache_dir : str
        Where the exported backbone (ONNX) is cached ("" = ``~/.cache/loupe/backbones``).
    threads : int
        Intra-op threads of the backbone runtime (0 = ``torch.get_num_threads()``, which the
        replica sets from ``--extractor-threads``).
    batch_images : int
        Most images described in one batch (1 = no batching). Concurrent Extract calls whose
        working images have the same size share stacked backbone passes.
    batch_wait_ms : float
        Longest a batch waits for more images after its first (milliseconds).
    """

    weights_path: str = ""
    global_config: GlobalConfig = GlobalConfig()
    max_pixels: int = MAX_IMAGE_PIXELS  # services/common/limits.py
    local_config: LocalConfig = LocalConfig()
    attention_path: str = ""
    regional_max_side: int = 1024
    regions_per_image: int = 5
    query_local_max_side: int = 0
    runtime: str = DEFAULT_RUNTIME
    query_runtime: str = DEFAULT_QUERY_RUNTIME
    runtime_cache_dir: str = ""
    threads: int = 0
    batch_images: int = DEFAULT_BATCH_IMAGES
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"extractor.runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.query_runtime and self.query_runtime not in RUNTIMES:
            raise ValueError(f"extractor.query_runtime must be '' or one of {RUNTIMES}, got {self.query_runtime!r}")
        if self.threads < 0:
            raise ValueError(f"extractor.threads must be >= 0, got {self.threads}")
        if not 1 <= self.batch_images <= MAX_BATCH_IMAGES:
            raise ValueError(f"extractor.batch_images must be in 1..{MAX_BATCH_IMAGES}, got {self.batch_images}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"extractor.batch_wait_ms must be in 0..1000, got {self.batch_wait_ms}")
        if self.max_pixels <= 0:
            raise ValueError(f"extractor.max_pixels must be > 0, got {self.max_pixels}")
        if not 0 <= self.regions_per_image <= MAX_REGIONS_PER_IMAGE:
            raise ValueError(f"extractor.regions_per_image must be in 0..{MAX_REGIONS_PER_IMAGE}, got {self.regions_per_image}")
        if self.query_local_max_side != 0 and not 32 <= self.query_local_max_side <= self.local_config.max_side:
            raise ValueError(f"extractor.query_local_max_side must be 0 or in 32..{self.local_config.max_side} (the local "
                             f"max side), got {self.query_local_max_side}")
        if self.regional_max_side != 0 and self.regional_max_side < 32:
            raise ValueError(f"extractor.regional_max_side must be 0 or >= 32, got {self.regional_max_side}")
