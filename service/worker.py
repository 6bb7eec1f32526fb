"""`npc worker`: an arq worker that runs pruning jobs (needs only REDIS_URL and the store)."""

from __future__ import annotations

import logging

from arq.connections import RedisSettings
from arq.worker import Worker

from service.jobs import prune_npc
from service.settings import Settings

QUEUE = "npc:jobs"


def build_worker(settings: Settings, redis_url: str) -> Worker:
    async def startup(ctx: dict) -> None:
        ctx["settings"] = settings

    return Worker(
        functions=[prune_npc],
        redis_settings=RedisSettings.from_dsn(redis_url),
        queue_name=QUEUE,
        on_startup=startup,
        max_jobs=1,            # one pruning job at a time: it uses every core
        job_timeout=3600,
        keep_result=24 * 3600,
        max_tries=3,
        handle_signals=True,
    )


def run(settings: Settings, redis_url: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    build_worker(settings, redis_url).run()
