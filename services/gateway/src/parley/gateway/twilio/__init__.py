"""Twilio: webhooks, Media Streams, ConversationRelay, signatures and REST call control."""
