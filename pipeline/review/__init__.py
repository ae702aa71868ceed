"""Human review: the decision log, the review queue, the review web app, accuracy sampling,
evaluation and Label Studio interop. Nothing here is imported by the workers; the writer only
calls tasks.open_review_tasks to keep the queue in step with the tags it writes."""
