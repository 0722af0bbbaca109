"""The teacher-feature cache: run the K frozen teachers once over V stored views of every training image,
then train any number of CBD / CBD_ENS students from the store instead of running the teachers."""
from fastcbd.cache.build import build_cache, cache_key
from fastcbd.cache.loader import CachedLoader
from fastcbd.cache.store import TeacherCache

__all__ = ["build_cache", "cache_key", "cached_loader", "CachedLoader", "TeacherCache"]


def cached_loader(loader, cache: TeacherCache, weights: list[str]):
    """The student's training `loader` (DeviceLoader, or TorchLoader over image files) serving cached views and
    the features of the teachers `weights` (hashes) from `cache`."""
    from fastcbd.data.device_loader import DeviceLoader

    if isinstance(loader, DeviceLoader):
        return CachedLoader.over(loader, cache, weights)
    from fastcbd.cache.files import CachedFileLoader

    return CachedFileLoader.over(loader, cache, weights)
