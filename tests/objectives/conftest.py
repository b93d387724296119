from tests.foundation.conftest import FAMILIES, make_backbone, perturb_lora  # noqa: F401  (fixture re-export)
