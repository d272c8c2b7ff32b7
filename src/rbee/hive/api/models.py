"""The model catalog."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from rbee.contracts.hive_api import CatalogList, ModelDeleted
from rbee.hive.state import HiveState, get_state

router = APIRouter()
State = Annotated[HiveState, Depends(get_state)]


@router.get("/v1/models")
async def list_models(state: State) -> CatalogList:
    return CatalogList(models=await asyncio.to_thread(state.catalog.models))


@router.delete("/v1/models/{model_id:path}")
async def delete_model(model_id: str, state: State) -> ModelDeleted:
    deleted = await asyncio.to_thread(state.catalog.delete, model_id)
    state.changed.set()
    return ModelDeleted(deleted=deleted)
