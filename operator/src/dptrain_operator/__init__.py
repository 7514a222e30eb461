"""dptrain operator: turns DPTrainingJobs into trainer pods and keeps each PrivateDataset's privacy ledger."""
