-- index.sqlite at schema version 1: as sqlite-utils wrote it before versions were kept (the
-- same structure version 1 creates); tests upgrade from it.
CREATE TABLE "instances" (
   "sop_instance_uid" TEXT PRIMARY KEY,
   "series_instance_uid" TEXT,
   "study_instance_uid" TEXT,
   "sop_class_uid" TEXT,
   "instance_number" INTEGER,
   "rows" INTEGER,
   "columns" INTEGER,
   "number_of_frames" INTEGER,
   "bits_allocated" INTEGER,
   "transfer_syntax_uid" TEXT,
   "digest" TEXT,
   "size" INTEGER,
   "received_at" REAL
);
CREATE TABLE "series" (
   "series_instance_uid" TEXT PRIMARY KEY,
   "study_instance_uid" TEXT,
   "modality" TEXT,
   "series_number" INTEGER,
   "series_description" TEXT,
   "series_date" TEXT,
   "series_time" TEXT,
   "body_part_examined" TEXT,
   "performed_procedure_step_start_date" TEXT
);
CREATE TABLE "studies" (
   "study_instance_uid" TEXT PRIMARY KEY,
   "patient_id" TEXT,
   "patient_name" TEXT,
   "patient_birth_date" TEXT,
   "patient_sex" TEXT,
   "issuer_of_patient_id" TEXT,
   "study_date" TEXT,
   "study_time" TEXT,
   "accession_number" TEXT,
   "study_id" TEXT,
   "study_description" TEXT,
   "referring_physician_name" TEXT,
   "source" TEXT,
   "created_at" REAL
);
CREATE INDEX "idx_instances_digest"
    ON "instances" ("digest");
CREATE INDEX "idx_instances_series_instance_uid"
    ON "instances" ("series_instance_uid");
CREATE INDEX "idx_instances_study_instance_uid"
    ON "instances" ("study_instance_uid");
CREATE INDEX "idx_series_modality"
    ON "series" ("modality");
CREATE INDEX "idx_series_study_instance_uid"
    ON "series" ("study_instance_uid");
CREATE INDEX "idx_studies_accession_number"
    ON "studies" ("accession_number");
CREATE INDEX "idx_studies_patient_id"
    ON "studies" ("patient_id");
CREATE INDEX "idx_studies_study_date"
    ON "studies" ("study_date");
