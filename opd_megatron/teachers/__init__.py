"""Teachers: one interface (`base.Teacher`) scoring student rollouts, one result (`base.TeacherScores`)."""
