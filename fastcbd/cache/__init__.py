"""The teacher-feature cache: run the K frozen teachers once over V stored views of every training image,
then train any number of CBD / CBD_ENS students from the store instead of running the teachers."""
from fastcbd.cache.build import build_cache, cache_key
from fastcbd.cache.loader import CachedLoader
from fastcbd.cache.store import TeacherCache

__all__ = ["build_cache", "cache_key", "CachedLoader", "TeacherCache"]
