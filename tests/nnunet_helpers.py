"""A toy nnU-Net v2 setup without a trained model or files: plans for one configuration, a small PlainConvUNet
(dynamic-network-architectures), and predictors (nnU-Net's own and patchblend's) initialised manually with them.
Shared by tests/test_nnunet.py and benchmarks/bench_nnunet.py; imports nnunetv2 (skip before importing this)."""
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


def toy_plans(patch_size, name="toy"):
    """Plans with one configuration ``name`` whose patch is ``patch_size`` (2 or 3 entries)."""
    nd = len(patch_size)
    return {
        "dataset_name": "Dataset999_Toy", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * 3, "original_median_shape_after_transp": [64] * 3,
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0, "percentile_00_5": -3.0,
                                                              "percentile_99_5": 3.0}},
        "configurations": {name: {
            "data_identifier": "toy", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch_size), "median_image_size_in_voxels": [64] * nd, "spacing": [1.0] * nd,
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "batch_dice": False,
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": {}, "_kw_requires_import": []},
        }},
    }


def toy_dataset_json(num_classes):
    labels = {"background": 0, **{f"c{k}": k for k in range(1, num_classes)}}
    return {"labels": labels, "channel_names": {"0": "CT"}, "numTraining": 1, "file_ending": ".nii.gz"}


def toy_unet(nd, in_channels=1, num_classes=3, features=(4, 8), seed=0):
    """A small PlainConvUNet (2 stages) with random weights, in eval mode."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if nd == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if nd == 3 else torch.nn.InstanceNorm2d
    net = PlainConvUNet(in_channels, len(features), list(features), conv, 3, [1] + [2] * (len(features) - 1),
                        [1] * len(features), num_classes, [1] * (len(features) - 1), conv_bias=True, norm_op=norm,
                        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=False)
    return net.eval()


def init_predictor(predictor, network, patch_size, num_classes, mirror_axes=None, name="toy"):
    """``predictor.manual_initialization`` with the toy plans; the network's current weights as the one fold."""
    plans = PlansManager(toy_plans(patch_size, name))
    predictor.manual_initialization(network, plans, plans.get_configuration(name),
                                    [{k: v.clone() for k, v in network.state_dict().items()}],
                                    toy_dataset_json(num_classes), "nnUNetTrainer", mirror_axes)
    return predictor


def nnunet_predictor(network, patch_size, num_classes, tile_step_size=0.5, mirror_axes=None, **kwargs):
    p = nnUNetPredictor(tile_step_size=tile_step_size, use_mirroring=mirror_axes is not None,
                        device=torch.device("cpu"), allow_tqdm=False, **kwargs)
    return init_predictor(p, network, patch_size, num_classes, mirror_axes)


def patchblend_predictor(network, patch_size, num_classes, tile_step_size=0.5, mirror_axes=None, **kwargs):
    from patchblend.integrations.nnunet import PatchblendPredictor
    p = PatchblendPredictor(tile_step_size=tile_step_size, use_mirroring=mirror_axes is not None,
                            device=torch.device("cpu"), allow_tqdm=False, **kwargs)
    return init_predictor(p, network, patch_size, num_classes, mirror_axes)
