"""The batch work on the device, for every recipe: flip, RandAugment, normalisation, random erasing."""
