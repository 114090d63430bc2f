"""The tutorial's FedAvgWorker, copied into a user's own module with its slips fixed.

Slips fixed (and nothing else): the undefined `role` is the worker's current role
(`self.role`); `sample_neighbours()` gets its two arguments; `np.random.choice` gets a list
of ids (it cannot sample a dict); `training_num` (undefined) is the sum of the selected
neighbours' sample counts; the imports. Registered under another name than `fed_avg`.
"""

import logging

import numpy as np

from fedrec.federated_worker import FederatedWorker, InvalidStateError
from fedrec.utilities import registry
from fedrec.utilities.random_state import RandomContext


@registry.load('fl_algo', 'tutorial_fed_avg')
class TutorialFedAvgWorker(FederatedWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    async def run(self):
        role = self.role
        assert role in self.roles, InvalidStateError("unknown role for worker")

        if role == 'aggregator':
            neighbours = await self.request_models_suspendable(
                self.sample_neighbours(self.round_idx, self.client_num_per_round))
            weighted_params = self.aggregate(neighbours)
            self.update_model(weighted_params)
        elif role == 'trainer':
            # central server in this case
            aggregators = list(self.out_neighbours.values())
            global_models = await self.request_models_suspendable(aggregators)
            self.update_model(global_models[0])
            await self.train(model_dir=self.persistent_storage)
        self.round_idx += 1

    # Your aggregation strategy
    def aggregate(self, neighbour_ids):
        model_list = [
            (self.in_neighbours[id].sample_num, self.in_neighbours[id].model)
            for id in neighbour_ids
        ]
        training_num = sum(num for num, _ in model_list)
        (num0, averaged_params) = model_list[0]
        for k in averaged_params.keys():
            for i in range(0, len(model_list)):
                local_sample_number, local_model_params = model_list[i]
                w = local_sample_number / training_num
                if i == 0:
                    averaged_params[k] = local_model_params[k] * w
                else:
                    averaged_params[k] += local_model_params[k] * w

        return averaged_params

    # Your sampling strategy
    def sample_neighbours(self, round_idx, client_num_per_round):
        num_neighbours = len(self.in_neighbours)
        if num_neighbours == client_num_per_round:
            selected_neighbours = [
                neighbour for neighbour in self.in_neighbours]
        else:
            with RandomContext(round_idx):
                selected_neighbours = np.random.choice(
                    list(self.in_neighbours), min(client_num_per_round, num_neighbours), replace=False)
        logging.info("worker_indexes = %s" % str(selected_neighbours))
        return selected_neighbours
